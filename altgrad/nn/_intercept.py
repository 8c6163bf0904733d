"""Interception of the user's linear layers: a clone of the model whose linear layers' calls are
sites (generated subclasses of their own classes, cached), whose recurrences carry their steps'
taps out, and how a site is named."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from altgrad.nn._sites import (
  _PATH_ATTRIBUTE,
  SITE_CLASSES,
  SiteError,
  _Delta,
  _Record,
  rnn_outputs_tapped,
  site,
  site_path,
)

_TAPPED_CLASSES: dict[type, type] = {}


def original_class(module: nnx.Module) -> type:
  """The user's class of a module made tappable (the class itself otherwise)."""
  cls = type(module)
  return cls.__mro__[1] if getattr(cls, "_altgrad_tapped", False) else cls


def _tapped_class(cls: type) -> type:
  """A cached subclass of ``cls`` whose calls are sites; identical outside a tapped pass."""
  if cls not in _TAPPED_CLASSES:

    def __call__(self, inputs, *args, **kwargs):
      if args or any(v is not None for v in kwargs.values()):  # out_sharding=None is the default
        raise SiteError(
          f"{cls.__name__} at {'/'.join(map(str, site_path(self)))} is called with arguments beyond "
          "its input; altgrad replays a site from its input alone: call it as layer(x)"
        )
      call = super(tapped, self).__call__
      return site(self, lambda delta: (inputs, call(inputs) if delta is None else call(inputs) + delta))

    tapped = type(
      cls.__name__, (cls,), {"__call__": __call__, "_altgrad_tapped": True, "__module__": cls.__module__}
    )
    tapped.__qualname__ = cls.__qualname__
    _TAPPED_CLASSES[cls] = tapped
  return _TAPPED_CLASSES[cls]


def is_site_module(module: nnx.Module) -> bool:
  """Whether calls of ``module`` are sites: an NNX linear layer or an altgrad site layer."""
  return isinstance(module, SITE_CLASSES) or getattr(type(module), "is_altgrad_site", False)


def site_modules(model: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module]]:
  """``(path, module)`` of every site module of ``model``, in module order, but those inside
  another site module: a layer that a site calls within its own call is part of that site
  (``nnx.LoRA``'s ``base_module``, ``nnx.LoRALinear``'s ``lora``)."""
  found = [(tuple(path), m) for path, m in nnx.iter_modules(model) if is_site_module(m)]
  return [(p, m) for p, m in found if not any(len(q) < len(p) and p[: len(q)] == q for q, _ in found)]


def make_tappable(model: nnx.Module) -> nnx.Module:
  """A clone of ``model`` whose site calls :func:`tapping` can record; ``model`` is untouched."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"altgrad rules take a Flax NNX model (an nnx.Module), got {type(model).__name__}")
  clone = nnx.clone(model)
  found = False
  for path, module in nnx.iter_modules(clone):
    if not is_site_module(module):
      continue
    found = True
    setattr(module, _PATH_ATTRIBUTE, tuple(path))
    if isinstance(module, SITE_CLASSES) and not getattr(type(module), "_altgrad_tapped", False):
      module.__class__ = _tapped_class(type(module))
  for path, module in nnx.iter_modules(clone):
    if isinstance(module, nnx.RNN):
      _record_steps(module)
      setattr(module, _PATH_ATTRIBUTE, tuple(path))
      module.__class__ = _tapped_rnn_class(type(module))
  if not found:
    raise SiteError(
      f"{type(model).__name__} has no linear layer (nnx.Linear, nnx.LinearGeneral, nnx.Conv, "
      "nnx.ConvTranspose, nnx.Einsum or an altgrad.nn layer): the rules assign credit at linear layers"
    )
  return clone


def _tapped_rnn_class(cls: type) -> type:
  """A cached subclass of an ``nnx.RNN`` class whose output sequence is a tap in a pass that asks
  for them (``rnn_outputs``); identical otherwise."""
  if cls not in _TAPPED_CLASSES:

    def __call__(self, inputs, **kwargs):
      outputs = super(tapped, self).__call__(inputs, **kwargs)
      if not rnn_outputs_tapped():
        return outputs
      _check_forward_in_time(self, kwargs)
      return site(self, lambda delta: (inputs, outputs if delta is None else outputs + delta))

    tapped = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    tapped.__qualname__ = cls.__qualname__
    _TAPPED_CLASSES[cls] = tapped
  return _TAPPED_CLASSES[cls]


def _check_forward_in_time(rnn: nnx.RNN, call: dict[str, Any]) -> None:
  """Target propagation reads an ``nnx.RNN``'s states as the batch-first sequence it returns,
  run forward from the cell's own initial carry (an LSTM's memory from zero)."""
  option = lambda name: call.get(name) if call.get(name) is not None else getattr(rnn, name)  # noqa: E731
  given = [name for name in ("return_carry", "time_major", "reverse") if option(name)]
  given += [name for name in ("seq_lengths", "initial_carry") if call.get(name) is not None]
  if given:
    raise SiteError(
      f"target_propagation carries targets back in time through nnx.RNN at {'/'.join(map(str, site_path(rnn)))}, "
      f"forward over a batch-first sequence from the cell's initial carry, but it runs with {', '.join(given)}: "
      "call it with the defaults, or use backprop, consequentialism or node_perturbation"
    )


def _record_steps(rnn: nnx.RNN) -> None:
  """``nnx.RNN`` scans its cell with the cell's state as the carry (its ``state_axes``), which a
  tap recorded on a site module inside the scan would change; the taps and perturbations of its
  sites go along the time axis instead, so they come out one per step."""
  axes = dict(rnn.state_axes.items())
  rnn.state_axes = nnx.StateAxes({nnx.Any(_Record, _Delta): 0, **axes})


def user_class(module: nnx.Module) -> type:
  """The user's own class of a module that altgrad made tappable or decorrelated."""
  cls = original_class(module)
  return getattr(cls, "_altgrad_decorrelated_base", cls)


def describe_site(path: Sequence[Any], module: nnx.Module) -> str:
  """``path (package.Class)`` of a site module, for error messages."""
  cls = user_class(module)
  return f"{'/'.join(map(str, path)) or 'the model'} ({cls.__module__.split('.')[0]}.{cls.__name__})"
