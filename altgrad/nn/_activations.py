"""Named activations with their derivative and, where it exists, a guarded inverse."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

#: Margin kept from the edge of a bounded range before inverting (docs/rules/target_propagation.rst, Guards: e = 1e-3).
INVERSE_MARGIN = 1e-3
LEAKY_RELU_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class Activation:
  """An elementwise activation ``a = fn(z)``.

  Attributes:
    name: the activation's name.
    fn: ``z -> a``.
    derivative: ``z -> a'(z)``.
    inverse_fn: ``a -> z`` guarded at the range boundaries, or None when ``fn`` has no inverse.
    inverse_derivative_fn: ``a -> (a^-1)'(a) = 1 / a'(z)``, guarded the same way, or None.
  """

  name: str
  fn: Callable[[Array], Array]
  derivative: Callable[[Array], Array]
  inverse_fn: Callable[[Array], Array] | None = None
  inverse_derivative_fn: Callable[[Array], Array] | None = None

  def __call__(self, z: Array) -> Array:
    return self.fn(z)

  @property
  def invertible(self) -> bool:
    """Whether the activation has an inverse (what target propagation and ER need)."""
    return self.inverse_fn is not None

  def _require_inverse(self) -> None:
    if not self.invertible:
      raise ValueError(
        f"activation {self.name!r} has no inverse; use one of "
        f"{sorted(n for n, a in _NAMED.items() if a.invertible)} for a rule that inverts layers"
      )

  def inverse(self, a: Array) -> Array:
    """Pre-activation whose image is ``a``; values outside the range are clipped first."""
    self._require_inverse()
    return self.inverse_fn(a)

  def inverse_derivative(self, a: Array) -> Array:
    """Derivative of the inverse at the output ``a``, i.e. ``1 / a'(z)`` (clipped like ``inverse``)."""
    self._require_inverse()
    return self.inverse_derivative_fn(a)


def _clip_open(a: Array, low: float, high: float) -> Array:
  margin = INVERSE_MARGIN * (high - low) / 2
  return jnp.clip(a, low + margin, high - margin)


def _tanh_inverse(a):
  return jnp.arctanh(_clip_open(a, -1.0, 1.0))


def _tanh_inverse_derivative(a):
  a = _clip_open(a, -1.0, 1.0)
  return 1.0 / (1.0 - a * a)


def _sigmoid_inverse(a):
  a = _clip_open(a, 0.0, 1.0)
  return jnp.log(a) - jnp.log1p(-a)


def _sigmoid_inverse_derivative(a):
  a = _clip_open(a, 0.0, 1.0)
  return 1.0 / (a * (1.0 - a))


@jax.jit
def altgrad_leaky_relu(z):
  """Jitted under this name so that a model's trace shows it (``altgrad.nn._chain`` reads it as
  an invertible activation between two sites)."""
  return jnp.where(z >= 0, z, LEAKY_RELU_SLOPE * z)


def _leaky_relu_derivative(z):
  return jnp.where(z >= 0, 1.0, LEAKY_RELU_SLOPE).astype(z.dtype)


def _leaky_relu_inverse(a):
  return jnp.where(a >= 0, a, a / LEAKY_RELU_SLOPE)


def _leaky_relu_inverse_derivative(a):
  return jnp.where(a >= 0, 1.0, 1.0 / LEAKY_RELU_SLOPE).astype(a.dtype)


_NAMED: dict[str, Activation] = {
  "tanh": Activation(
    "tanh", jnp.tanh, lambda z: 1.0 - jnp.tanh(z) ** 2, _tanh_inverse, _tanh_inverse_derivative
  ),
  "sigmoid": Activation(
    "sigmoid",
    jax.nn.sigmoid,
    lambda z: jax.nn.sigmoid(z) * (1.0 - jax.nn.sigmoid(z)),
    _sigmoid_inverse,
    _sigmoid_inverse_derivative,
  ),
  "relu": Activation("relu", jax.nn.relu, lambda z: (z > 0).astype(z.dtype)),
  "leaky_relu": Activation(
    "leaky_relu",
    altgrad_leaky_relu,
    _leaky_relu_derivative,
    _leaky_relu_inverse,
    _leaky_relu_inverse_derivative,
  ),
  "identity": Activation("identity", lambda z: z, jnp.ones_like, lambda a: a, jnp.ones_like),
}

ACTIVATIONS: tuple[str, ...] = tuple(_NAMED)


def get_activation(activation: str | Callable[[Array], Array] | Activation) -> Activation:
  """Returns the :class:`Activation` named by ``activation`` or wrapping a function.

  A plain function gets its derivative from ``jax.grad`` and no inverse.
  """
  if isinstance(activation, Activation):
    return activation
  if isinstance(activation, str):
    try:
      return _NAMED[activation]
    except KeyError:
      raise ValueError(
        f"unknown activation {activation!r}; expected one of {list(_NAMED)} or a function"
      ) from None
  if callable(activation):
    fn = activation
    derivative = jax.vmap(jax.grad(fn))
    name = getattr(fn, "__name__", repr(fn))
    return Activation(name, fn, lambda z: derivative(z.ravel()).reshape(z.shape))
  raise TypeError(f"activation must be a name or a function, got {type(activation).__name__}")
