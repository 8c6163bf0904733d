"""What defines a run, written down so that two runs can be compared: the model's structure, the
optax transformation's functions and hyperparameters, the data set.

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

from altgrad.nn._activations import Activation

#: Module attributes that are a mode, not the model: a model in eval mode is the same model.
_MODES = {"deterministic", "use_running_average", "training"}
#: Beyond this many entries a description stops (a closure holding a large structure).
_LIMIT = 4000


def _text(value: Any) -> str | None:
  """A short, deterministic text of a static value, or None for what is not described."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return repr(value)
  if isinstance(value, Activation):
    return f"activation {value.name}"
  if isinstance(value, (np.dtype, type(np.float32))) or (isinstance(value, type) and issubclass(value, np.generic)):
    return str(np.dtype(value))
  if isinstance(value, functools.partial):
    inner = [_text(value.func), *map(_text, value.args), *(f"{k}={_text(v)}" for k, v in sorted(value.keywords.items()))]
    return f"partial({', '.join(str(t) for t in inner)})"
  if inspect.isfunction(value) or inspect.isbuiltin(value) or isinstance(value, type):
    return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
  if isinstance(value, (tuple, list)):
    parts = [_text(v) for v in value]
    return None if None in parts else f"({', '.join(parts)})"
  if isinstance(value, (jax.Array, np.ndarray)) and getattr(value, "size", 0) <= 16:
    try:
      return repr(np.asarray(value).tolist())
    except Exception:  # a tracer or a key: its type then
      return f"array {getattr(value, 'dtype', '')}{tuple(getattr(value, 'shape', ()))}"
  if isinstance(value, (jax.Array, np.ndarray)):
    return f"array {value.dtype}{tuple(value.shape)}"
  return None


def model_signature(model: nnx.Module) -> dict[str, str]:
  """Every module's class and static attributes (sizes, activations, dtypes, initializers) and
  every param's shape and dtype, by path; the model's mode (train or eval) is not part of it."""
  from altgrad.nn._intercept import original_class

  out = {}
  for path, module in nnx.iter_modules(model):
    where = "/".join(map(str, path)) or "."
    cls = original_class(module)
    out[f"{where}:class"] = f"{cls.__module__}.{cls.__qualname__}"
    for name, value in sorted(vars(module).items()):
      if name.startswith("_") or name.startswith("altgrad_") or name in _MODES:
        continue
      if isinstance(value, (nnx.Variable, nnx.Module)):
        continue
      text = _text(value)
      if text is not None:
        out[f"{where}:{name}"] = text
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    array = value.get_value() if hasattr(value, "get_value") else value
    out[f"{'/'.join(map(str, path))}:param"] = f"{array.dtype}{tuple(array.shape)}"
  return out


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
  from altgrad.rules._common import Rule

  if isinstance(value, Rule):
    if id(value) in seen:
      return
    seen.add(id(value))
    rules.append(value)
    out[path] = f"rule {value.name}"
    out[f"{path}.seed"] = repr(np.asarray(jax.random.key_data(value.seed)).tolist())
    for name in ("loss_fn", "unpack"):
      out[f"{path}.{name}"] = str(_text(getattr(value, name)))
    out[f"{path}.apply"] = str(_text(value.pure.apply))
    return
  if isinstance(value, (nnx.Module, nnx.GraphDef)) or type(value).__name__ == "PureModel":
    return  # a model is described by model_signature
  text = _text(value)
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
