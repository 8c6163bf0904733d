"""What defines a run, written down so that two runs can be compared: the model's structure
(``altgrad.nn._signature``), the optax transformation's functions and hyperparameters, the data set.

A checkpoint saves these; resuming compares them with the run being resumed and refuses another
run by listing what differs. ``fit`` also compares a rule's model with the model it is given.
Each description is a flat ``{path: text}`` dict, deterministic across processes (no memory
addresses), so that the differences can be listed by path.
"""

from __future__ import annotations

import functools
import inspect
import zlib
from typing import Any

import jax
import numpy as np
from flax import nnx

from altgrad.nn._signature import describe_value
from altgrad.rules._common import Rule

#: Beyond this many entries a description stops (a closure holding a large structure).
_LIMIT = 4000


def describe_transformation(tx: Any) -> dict[str, str]:
  """The functions an optax transformation is made of and what they close over (hyperparameters,
  schedules, nested transformations, altgrad rules), by path."""
  out: dict[str, str] = {}
  _walk(tx, "tx", out, set(), [])
  return out


def rules_in(tx: Any) -> list:
  """The altgrad rules an optax transformation is built of (``altgrad.rules._common.Rule``)."""
  found: list = []
  _walk(tx, "tx", {}, set(), found)
  return found


def _walk(value: Any, path: str, out: dict[str, str], seen: set[int], rules: list) -> None:
  if len(out) >= _LIMIT:
    return
  if isinstance(value, Rule):
    if id(value) in seen:
      return
    seen.add(id(value))
    rules.append(value)
    out[path] = f"rule {value.name}"
    out[f"{path}.seed"] = repr(np.asarray(jax.random.key_data(value.seed)).tolist())
    for name in ("loss_fn", "unpack"):
      out[f"{path}.{name}"] = str(describe_value(getattr(value, name)))
    out[f"{path}.apply"] = str(describe_value(value.pure.apply))
    return
  if isinstance(value, (nnx.Module, nnx.GraphDef)) or type(value).__name__ == "PureModel":
    return  # a model is described by model_signature
  text = describe_value(value)
  if text is not None and not (inspect.isfunction(value) or isinstance(value, (tuple, list, functools.partial))):
    out[path] = text
    return
  if id(value) in seen:
    return
  seen.add(id(value))
  if isinstance(value, (tuple, list)):
    for i, item in enumerate(value):
      _walk(item, f"{path}[{i}]", out, seen, rules)
  elif isinstance(value, dict):
    for key in sorted(value, key=str):
      _walk(value[key], f"{path}[{key!r}]", out, seen, rules)
  elif isinstance(value, functools.partial):
    _walk(value.func, f"{path}.func", out, seen, rules)
    _walk((value.args, value.keywords), f"{path}.arguments", out, seen, rules)
  elif inspect.isfunction(value):
    out[path] = f"{value.__module__}.{value.__qualname__}"
    for name, cell in zip(value.__code__.co_freevars, value.__closure__ or (), strict=True):
      try:
        contents = cell.cell_contents
      except ValueError:  # a cell not yet filled
        continue
      _walk(contents, f"{path}.{name}", out, seen, rules)
  elif inspect.ismethod(value):
    _walk(value.__func__, path, out, seen, rules)
    _walk(value.__self__, f"{path}.self", out, seen, rules)
  elif hasattr(value, "__dict__") and not inspect.ismodule(value):
    out[path] = f"{type(value).__module__}.{type(value).__qualname__}"
    for name, item in sorted(vars(value).items()):
      _walk(item, f"{path}.{name}", out, seen, rules)
  else:
    out[path] = type(value).__qualname__


def data_signature(data: Any) -> dict[str, str]:
  """A data set's name, split sizes, shapes and a checksum of its training and test arrays."""
  checksum = 0
  for array in (data.x_train, data.y_train, data.x_test, data.y_test):
    checksum = zlib.crc32(np.ascontiguousarray(array).tobytes(), checksum)
  return {
    "name": str(data.name),
    "train": f"{len(data.x_train)} x {tuple(np.shape(data.x_train)[1:])}",
    "test": f"{len(data.x_test)} x {tuple(np.shape(data.x_test)[1:])}",
    "checksum": f"{checksum:08x}",
  }


def differences(
  saved: dict[str, Any], now: dict[str, Any], names: tuple[str, str] = ("saved", "now"), prefix: str = ""
) -> list[str]:
  """``path: saved X, now Y`` for every entry that differs between two (nested) descriptions."""
  found = []
  for key in sorted(set(saved) | set(now), key=str):
    a, b = saved.get(key, "(none)"), now.get(key, "(none)")
    if isinstance(a, dict) and isinstance(b, dict):
      found += differences(a, b, names, f"{prefix}{key}.")
    elif a != b:
      found.append(f"{prefix}{key}: {names[0]} {a}, {names[1]} {b}")
  return found
