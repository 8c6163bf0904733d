"""2-D convolution (NHWC inputs, HWIO kernel) with an exposed linear part."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad.nn._activations import Activation, get_activation
from altgrad.nn._base import SingleSite, computed_in, describe_shape
from altgrad.nn._decorrelation import Decorrelating
from altgrad.nn._matrix_form import KernelLayout, design_rows, patch_layout, stacked_matrix

Array = jax.Array


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
    raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
  return pair


class Conv(SingleSite, Decorrelating):
  """``y = activation(conv(x, kernel) + bias)`` on inputs shaped ``(batch, height, width, in_features)``.

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: ``(kh, kw)`` or one int.
    strides: ``(sh, sw)`` or one int.
    padding: ``"SAME"``, ``"VALID"`` or explicit ``((top, bottom), (left, right))``.
    activation: a name from ``altgrad.nn.ACTIVATIONS`` or a function.
    use_bias: whether to add a bias per output channel.
    kernel_init: initializer of the ``(kh, kw, in_features, out_features)`` kernel.
    param_dtype: dtype of the parameters.
    dtype: the dtype of the computation (``None``: that of the inputs and params), as Flax's.
    decorrelation_lr: if given, the input patches are decorrelated by ``R`` (folded into the
      kernel: one convolution), as :class:`Dense`'s inputs are.
    decorrelation_sample: the fraction of a batch's images the decorrelation update is
      estimated on (all their patches count).
    decorrelation_kappa: the weight in ``[0, 1]`` of artcogsys/decorbp's unit-variance term,
      ``R <- R - lr R ((1 - kappa) C + kappa diag(diag(M) - 1))`` with ``M`` the second moment
      (``0``, default: the node-perturbation authors' rule; decorbp's ResNet config uses 0.01).
    rngs: Flax NNX random streams.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int] = 3,
    *,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    activation: str | Callable[[Array], Array] | Activation = "relu",
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
      raise ValueError(f"Conv needs positive channel counts, got {in_features} -> {out_features}")
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = _pair(kernel_size, "kernel_size")
    self.strides = _pair(strides, "strides")
    self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
    self.activation = get_activation(activation)
    self.dtype = dtype
    shape = (*self.kernel_size, in_features, out_features)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.start_decorrelation(decorrelation_lr, decorrelation_sample, decorrelation_kappa)

  def kernel_layout(self) -> KernelLayout:
    """The features are the input patches, ordered (in, kh, kw); the kernel in that order."""
    return patch_layout(self.kernel[...], self.kernel_size, self.strides, self.padding, (1, 1))

  def linear(self, x: Array) -> Array:
    bias = None if self.bias is None else self.bias[...]
    x, kernel, bias = computed_in(self.dtype, x, self.effective_kernel(), bias)
    z = jax.lax.conv_general_dilated(
      x.astype(jnp.result_type(x, kernel)),  # as a matmul would: bfloat16 inputs meet float32 params
      kernel,
      window_strides=self.strides,
      padding=self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return z if bias is None else z + bias

  def design(self, x: Array) -> Array:
    """One row per output position: the (decorrelated) input patch, features ordered (in, kh, kw)."""
    return design_rows(self.decorrelated(self.kernel_layout().features(x)), self.bias is not None)

  def matrix(self) -> Array:
    kernel = self.kernel_layout().to_matrix(self.kernel[...])
    return stacked_matrix(kernel, None if self.bias is None else self.bias[...])

  def check_input(self, x: Any) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != self.in_features:
      raise ValueError(
        f"Conv expects inputs shaped (batch, height, width, {self.in_features}), got {describe_shape(x)}"
      )
