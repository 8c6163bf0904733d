"""Input decorrelation at any site: a matrix ``R`` in front of a linear layer's input features.

A decorrelated site computes ``z = (f(x) R) K + b``, where ``f(x)`` are the rows of the site's
matrix form (a dense layer's input vectors, a convolution's input patches). ``R`` starts at the
identity and is a :class:`Decorrelation` variable (model state, never an ``nnx.Param``); every
rule advances it after each step on the step's clean inputs, ``R <- R - lr R C`` with ``C`` the
off-diagonal second moment of ``f(x) R`` (docs/rules/node_perturbation.rst; artcogsys/decorbp's update in row
layout), or with ``kappa > 0`` decorbp's whole rule, which also pulls each unit's second moment
toward 1: ``R <- R - lr R ((1 - kappa) offdiag(M) + kappa diag(diag(M) - 1))``. A dense layer multiplies its input by ``R``; a convolution multiplies its kernel,
``K <- R K`` in patch layout, so its forward pass stays one convolution (as decorbp does).

:func:`decorrelate` converts the linear layers of any NNX model (a clone: each chosen
``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Conv`` gets a generated subclass of its own
class, altgrad's ``Dense`` and ``Conv`` their own ``R``); :func:`fold_decorrelation` folds every
``R`` into its kernel and gives back a model of the user's classes with the same outputs.
``Dense(decorrelation_lr=...)`` is the same mechanism, set at construction.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from altgrad import _mesh
from altgrad.nn._base import check_number, computed_in
from altgrad.nn._intercept import describe_site, site_modules
from altgrad.nn._matrix_form import kernel_layout
from altgrad.nn._sites import SiteError

Array = jax.Array


class Decorrelation(nnx.Variable):
  """A layer's decorrelating matrix ``R``: model state that rules update, never an ``nnx.Param``,
  so an optax optimizer never sees it."""


def check_kappa(kappa: Any) -> float:
  """The weight of the decorrelation update's unit-variance term, checked."""
  if not (isinstance(kappa, (int, float)) and not isinstance(kappa, bool) and 0 <= kappa <= 1):
    raise ValueError(f"decorrelation_kappa weighs the unit-variance term in [0, 1], got {kappa!r}")
  return float(kappa)


def check_sample(sample: Any) -> float:
  """The fraction of a batch the decorrelation update is estimated on, checked."""
  if not (isinstance(sample, (int, float)) and not isinstance(sample, bool) and 0 < sample <= 1):
    raise ValueError(f"decorrelation_sample is a fraction of the batch in (0, 1], got {sample!r}")
  return float(sample)


def decorrelation_update(r: Array, decorrelated: Array, lr: float, kappa: float = 0.0) -> Array:
  """``R - lr R C`` with ``C`` the off-diagonal part of ``M = y^T y / n`` for rows ``y = f(x) R``;
  with ``kappa``, ``R - lr R ((1 - kappa) C + kappa diag(diag(M) - 1))`` (artcogsys/decorbp's
  ``Decorrelation.update``, whose code scales the rows of ``R``, ``diag(diag(M) - 1) R`` in this
  layout, where this scales its columns, each output unit by its own variance: the two agree
  at ``R = I`` and differ in second order near it).

  ``R M`` is formed as ``(R y^T) y / n``: two thin products instead of a cubic one. Inside
  ``shard_map`` the moments are over every device's rows.
  """
  count = _mesh.batch_count(decorrelated.shape[0])
  full = _mesh.batch_sum((r @ decorrelated.T) @ decorrelated) / count
  diagonal = _mesh.batch_sum(jnp.sum(decorrelated * decorrelated, axis=0)) / count
  decorrelating = full - r * diagonal[None, :]
  if not kappa:  # the node-perturbation authors' rule, exactly
    return r - lr * decorrelating
  return r - lr * ((1 - kappa) * decorrelating + kappa * r * (diagonal - 1)[None, :])


def _strided(x: Array, fraction: float) -> Array:
  """Every ``k``-th example of ``x`` (its leading axis), ``round(fraction * len(x))`` of them."""
  count = max(1, round(x.shape[0] * fraction))
  return x[:: x.shape[0] // count][:count]


class Decorrelating:
  """What every decorrelated site has: ``R`` (or ``None``), its learning rate and sample.

  A site class mixes this in and gives :meth:`decorrelation_features`; ``dtype`` is its compute
  dtype (Flax's ``dtype=``).
  """

  decorrelation: Decorrelation | None
  decorrelation_lr: float | None
  decorrelation_sample: float
  decorrelation_kappa: float

  def start_decorrelation(self, lr: float | None, sample: float = 1.0, kappa: float = 0.0) -> None:
    """Gives the site ``R = I`` moved by ``lr`` (none for ``None``), estimated on ``sample``,
    with the unit-variance term weighted by ``kappa``."""
    if lr is not None:
      check_number(lr, "decorrelation_lr")
    self.decorrelation_sample = check_sample(sample)
    self.decorrelation_kappa = check_kappa(kappa)
    self.decorrelation_lr = lr
    width = self.decorrelation_width()
    r = None if lr is None else Decorrelation(jnp.eye(width, dtype=self.kernel[...].dtype))
    self.decorrelation = nnx.data(r)  # data whether set at construction or later

  def decorrelation_width(self) -> int:
    """``d``: the width of the features ``R`` acts on."""
    return kernel_layout(self).to_matrix(self.kernel[...]).shape[0]

  def decorrelation_features(self, x: Any) -> Array:
    """The site's input ``x`` as feature rows ``(n, d)``, the rows ``R`` multiplies."""
    return kernel_layout(self).features(x)

  def decorrelated(self, features: Array) -> Array:
    """``features R`` (features shaped ``(..., d)``) in the compute dtype; ``features``
    themselves without decorrelation."""
    if self.decorrelation is None:
      return features
    features, r = computed_in(getattr(self, "dtype", None), features, self.decorrelation[...])
    return features @ r

  def decorrelation_step(self, inputs: Array | Sequence[Array]) -> Array:
    """The next ``R`` from the inputs of one or more calls of the site: the update on every
    ``k``-th example of each (a ``decorrelation_sample`` of the batch; for a convolution, of
    the images, whose patches all count)."""
    calls = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    features = [self.decorrelation_features(_strided(x, self.decorrelation_sample)) for x in calls]
    rows = self.decorrelated(jnp.concatenate(features))
    return decorrelation_update(self.decorrelation[...], rows, self.decorrelation_lr, self.decorrelation_kappa)

  def effective_kernel(self) -> Array:
    """The kernel with ``R`` folded in (``R K`` in matrix layout): the map from the raw input."""
    kernel = self.kernel[...]
    if self.decorrelation is None:
      return kernel
    layout = kernel_layout(self)
    return layout.from_matrix(self.decorrelation[...].astype(kernel.dtype) @ layout.to_matrix(kernel))


_DECORRELATED_CLASSES: dict[type, type] = {}


def _decorrelated_class(cls: type) -> type:
  """A cached subclass of an NNX linear layer class whose input features are decorrelated."""
  if cls in _DECORRELATED_CLASSES:
    return _DECORRELATED_CLASSES[cls]

  def __call__(self, inputs, *args, **kwargs):
    if kernel_layout(self).fused:  # the layer's own call with R K as its kernel: one convolution
      with_fused_kernel = types.SimpleNamespace(**(vars(self) | {"kernel": self.effective_kernel()}))
      return cls.__call__(with_fused_kernel, inputs, *args, **kwargs)
    lead = inputs.shape[: inputs.ndim - _contracted(self)]
    decorrelated = self.decorrelated(inputs.reshape(*lead, -1)).reshape(inputs.shape)
    return cls.__call__(self, decorrelated, *args, **kwargs)

  decorrelated = type(
    cls.__name__,
    (cls, Decorrelating),
    {
      "__call__": __call__,
      "_altgrad_decorrelated_base": cls,
      "__module__": cls.__module__,
    },
  )
  decorrelated.__qualname__ = cls.__qualname__
  _DECORRELATED_CLASSES[cls] = decorrelated
  return decorrelated


def _contracted(module: nnx.Module) -> int:
  """How many trailing input axes an ``nnx.Linear`` or ``nnx.LinearGeneral`` contracts."""
  return len(module.in_features) if isinstance(module.in_features, tuple) else 1


def _expected_kernel_ndim(module: nnx.Module) -> int:
  if isinstance(module, nnx.Conv):
    return len(module.kernel_size) + 2
  if isinstance(module, nnx.LinearGeneral):
    return len(module.in_features) + len(module.out_features)
  return 2


def decorrelate(model: nnx.Module, lr: float, *, sample: float = 1.0, kappa: float = 0.0, only: Any = ...) -> nnx.Module:
  """A clone of ``model`` with a decorrelating matrix ``R`` in front of every chosen site.

  Args:
    model: any NNX model; it is not modified.
    lr: the decorrelation learning rate (``decorrelation_lr`` of ``altgrad.nn.Dense``).
    sample: the fraction of each batch the update is estimated on (``decorrelation_sample``).
    kappa: the weight of the unit-variance term (``decorrelation_kappa``): ``0`` (default) the
      node-perturbation authors' rule, ``0.01`` the decorrelated-backprop code's ResNet setting.
    only: an NNX filter of ``(path, module)`` choosing the linear layers to decorrelate (a
      class such as ``nnx.Conv``, ``nnx.PathContains('encoder')``, a predicate); default all.

  ``nnx.Linear``, ``nnx.LinearGeneral`` (contracting its last axes, no batch axes: attention's
  projections) and ``nnx.Conv`` (no feature groups, mask or input dilation) decorrelate their
  input features; altgrad's ``Dense`` and ``Conv`` theirs. A chosen layer that cannot is an
  error naming it (leave it out with ``only``). Params and their paths are unchanged, so an
  optimizer state or a checkpoint of the params still fits; ``R`` is one more variable.
  """
  check_sample(sample)
  check_kappa(kappa)
  chosen = nnx.filterlib.to_predicate(only)
  clone = nnx.clone(model)
  converted = 0
  for path, module in site_modules(clone):
    if not chosen(path, module):
      continue
    if getattr(module, "decorrelation", None) is not None:
      raise SiteError(f"{describe_site(path, module)} is decorrelated already")
    if isinstance(module, Decorrelating):
      module.start_decorrelation(lr, sample, kappa)
    elif kernel_layout(module) is not None and module.kernel[...].ndim == _expected_kernel_ndim(module):
      module.__class__ = _decorrelated_class(type(module))
      module.start_decorrelation(lr, sample, kappa)
    else:
      raise SiteError(
        f"{describe_site(path, module)} cannot be decorrelated: altgrad decorrelates the input features of "
        "nnx.Linear, nnx.LinearGeneral over its last axes, nnx.Conv without feature groups, mask or "
        "input dilation (not inside a stack of layers made by nnx.vmap), and altgrad's Dense and Conv; "
        "leave it out with only= (an NNX filter, e.g. only=nnx.Linear)"
      )
    converted += 1
  if not converted:
    raise SiteError(f"{type(model).__name__} has no linear layer that only={only!r} chooses to decorrelate")
  return clone


def fold_decorrelation(model: nnx.Module) -> nnx.Module:
  """A clone of ``model`` with every ``R`` folded into its kernel (``K <- R K``): the same outputs
  from a model of the user's own classes with no decorrelation left, for deployment or as
  pretrained weights."""
  clone = nnx.clone(model)
  for _, module in nnx.iter_modules(clone):
    if getattr(module, "decorrelation", None) is None:
      continue
    module.kernel[...] = module.effective_kernel()
    base = getattr(type(module), "_altgrad_decorrelated_base", None)
    if base is None:  # altgrad's Dense and Conv keep their class
      module.start_decorrelation(None)
      continue
    for name in ("decorrelation", "decorrelation_lr", "decorrelation_sample", "decorrelation_kappa"):
      delattr(module, name)
    module.__class__ = base
  return clone
