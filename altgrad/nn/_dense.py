"""Dense layer with an exposed linear part and a regularized inverse."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad._linalg import RidgeSolver
from altgrad.nn._activations import Activation, get_activation
from altgrad.nn._base import SingleSite, computed_in, describe_shape, ridge_solver
from altgrad.nn._decorrelation import Decorrelating
from altgrad.nn._matrix_form import DENSE_LAYOUT, KernelLayout, design_rows, stacked_matrix

Array = jax.Array


class Dense(SingleSite, Decorrelating):
  """``y = activation(x @ kernel + bias)`` on inputs shaped ``(..., in_features)``.

  Args:
    in_features: width of the input.
    out_features: width of the output.
    activation: a name from ``altgrad.nn.ACTIVATIONS`` or a function.
    use_bias: whether to add a bias.
    kernel_init: initializer of the ``(in_features, out_features)`` kernel.
    param_dtype: dtype of the parameters.
    dtype: the dtype of the computation (``None``: that of the inputs and params), as Flax's
      layers take it: ``param_dtype=float32, dtype=bfloat16`` is mixed precision.
    decorrelation_lr: if given, a decorrelating matrix ``R`` (identity at first, a
      :class:`Decorrelation` variable, never an ``nnx.Param``) is applied to the input before the
      kernel, ``linear(x) = (x R) K + b``, and every rule moves it by this learning rate after
      each step, ``R <- R - lr R C`` with ``C`` the off-diagonal second moment of ``x R`` (docs/rules/node_perturbation.rst);
      the same as ``altgrad.nn.decorrelate`` gives any linear layer.
    decorrelation_sample: the fraction of a batch's rows that ``C`` is estimated on (evenly
      strided rows of the batch, which training shuffles). ``1.0`` (default) uses the whole batch,
      as the node-perturbation authors' code does; a fraction such as ``0.1`` (the decorrelated
      backprop literature's subsample, e.g. artcogsys/decorbp's ``downsample_perc``) makes the
      update ``1 / fraction`` times cheaper; it is the costliest part of a decorrelated step.
    decorrelation_kappa: the weight in ``[0, 1]`` of artcogsys/decorbp's unit-variance term,
      ``R <- R - lr R ((1 - kappa) C + kappa diag(diag(M) - 1))`` with ``M`` the second moment
      (``0``, default: the node-perturbation authors' rule; decorbp's ResNet config uses 0.01).
    rngs: Flax NNX random streams.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    activation: str | Callable[[Array], Array] | Activation = "tanh",
    use_bias: bool = True,
    kernel_init: Callable[..., Array] = nnx.initializers.lecun_normal(),
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
    decorrelation_lr: float | None = None,
    decorrelation_sample: float = 1.0,
    decorrelation_kappa: float = 0.0,
    rngs: nnx.Rngs,
  ):
    if in_features < 1 or out_features < 1:
      raise ValueError(f"Dense needs positive sizes, got {in_features} -> {out_features}")
    self.in_features = in_features
    self.out_features = out_features
    self.activation = get_activation(activation)
    self.dtype = dtype
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.start_decorrelation(decorrelation_lr, decorrelation_sample, decorrelation_kappa)

  def kernel_layout(self) -> KernelLayout:
    """The kernel is the matrix; the features are the input vectors."""
    return DENSE_LAYOUT

  def linear(self, x: Array) -> Array:
    x, kernel, bias = computed_in(self.dtype, self.decorrelated(x), self.kernel[...], self.bias_value())
    z = x @ kernel
    return z if bias is None else z + bias

  def bias_value(self) -> Array | None:
    """The bias (``None`` without one)."""
    return None if self.bias is None else self.bias[...]

  def design(self, x: Array) -> Array:
    return design_rows(self.decorrelated(x), self.bias is not None)

  def matrix(self) -> Array:
    return stacked_matrix(self.kernel[...], None if self.bias is None else self.bias[...])

  def check_input(self, x: Any) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 2 or shape[-1] != self.in_features:
      raise ValueError(f"Dense expects inputs shaped (batch, {self.in_features}), got {describe_shape(x)}")

  def ridge_solver(self, reg: float | Array) -> RidgeSolver:
    """The factored regularized normal matrix of the kernel, to reuse across inverse calls."""
    return ridge_solver(self.effective_kernel(), reg)

  def inverse(
    self, target: Array, *, reg: float | Array | None = None, solver: RidgeSolver | None = None
  ) -> Array:
    """Regularized inverse (docs/rules/target_propagation.rst): ``argmin_x ||a^-1(target) - linear(x)||^2 + reg ||x||^2``.

    Give ``reg``, or a ``solver`` from :meth:`ridge_solver` to factor once for many calls.
    """
    solver = ridge_solver(self.effective_kernel(), reg, solver)
    z = self.activation.inverse(target)
    if self.bias is not None:
      z = z - self.bias[...]
    return solver(z)

  def inverse_linearized(
    self,
    displacement: Array,
    output: Array,
    *,
    reg: float | Array | None = None,
    solver: RidgeSolver | None = None,
  ) -> Array:
    """The inverse's first-order change at ``output`` for an output ``displacement``.

    ``(displacement * (a^-1)'(output)) K^T (K K^T + reg I)^-1``: the Jacobian of
    :meth:`inverse` at ``output`` applied to ``displacement``.
    """
    solver = ridge_solver(self.effective_kernel(), reg, solver)
    return solver(displacement * self.activation.inverse_derivative(output))
