"""Chains of layers: Sequential, Flatten and the MLP."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad.nn._activations import Activation
from altgrad.nn._base import Layer, describe_shape
from altgrad.nn._dense import Dense

Array = jax.Array


class Flatten(Layer):
  """Reshapes ``(batch, ...)`` to ``(batch, features)``; has no site."""

  def sites(self):
    return ()

  def __call__(self, x):
    return x.reshape(x.shape[0], -1)

  def check_input(self, x: Any) -> None:
    if getattr(x, "ndim", 0) < 2:
      raise ValueError(f"Flatten expects inputs with a batch axis and features, got {describe_shape(x)}")


class Sequential(Layer):
  """Applies ``layers`` in order; its sites are theirs, concatenated in forward order."""

  def __init__(self, *layers: Layer):
    if not layers:
      raise ValueError("Sequential needs at least one layer")
    for layer in layers:
      if not isinstance(layer, Layer):
        raise TypeError(
          f"Sequential takes altgrad.nn layers (Dense, Conv, SimpleRNN, Flatten, ...), "
          f"got {type(layer).__name__}"
        )
    self.layers = nnx.List(layers)

  def sites(self):
    return tuple(site for layer in self.layers for site in layer.sites())

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x

  def check_input(self, x: Any) -> None:
    self.layers[0].check_input(x)


class MLP(Sequential):
  """A stack of :class:`Dense` layers of widths ``sizes = (in, hidden..., out)``.

  Args:
    sizes: layer widths, input first; at least two.
    activation: activation of the hidden layers.
    output_activation: activation of the last layer; ``None`` gives raw outputs (logits).
    decorrelation_lr: if given, every layer decorrelates its input (see :class:`Dense`).
    decorrelation_sample: the fraction of each batch the decorrelation update is estimated on
      (see :class:`Dense`).
    decorrelation_kappa: the weight of the decorrelation's unit-variance term (see :class:`Dense`).
    kernel_init: initializer of every kernel (LeCun normal by default; the node-perturbation
      authors use He normal, ``nnx.initializers.he_normal()``).
    param_dtype, dtype: of the parameters and of the computation (see :class:`Dense`).
    rngs: Flax NNX random streams.
  """

  def __init__(
    self,
    sizes: Sequence[int],
    *,
    activation: str | Callable[[Array], Array] | Activation = "tanh",
    output_activation: str | Callable[[Array], Array] | Activation | None = None,
    decorrelation_lr: float | None = None,
    decorrelation_sample: float = 1.0,
    decorrelation_kappa: float = 0.0,
    kernel_init: Callable[..., Array] = nnx.initializers.lecun_normal(),
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
    rngs: nnx.Rngs,
  ):
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2:
      raise ValueError(f"MLP needs at least an input and an output size, got {sizes}")
    last = len(sizes) - 2
    super().__init__(
      *(
        Dense(
          n_in,
          n_out,
          activation=activation if i < last else (output_activation or "identity"),
          decorrelation_lr=decorrelation_lr,
          decorrelation_sample=decorrelation_sample,
          decorrelation_kappa=decorrelation_kappa,
          kernel_init=kernel_init,
          param_dtype=param_dtype,
          dtype=dtype,
          rngs=rngs,
        )
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
      )
    )
    self.sizes = sizes
