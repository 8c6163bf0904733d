"""What a model is, written down so that two models can be compared: every module's class and
static attributes and every param's shape and dtype, by path (``altgrad._identity`` writes down
a whole run with it). Each description is a flat ``{path: text}`` dict, deterministic across
processes (no memory addresses)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import numpy as np
from flax import nnx

from altgrad.nn._activations import Activation
from altgrad.nn._intercept import original_class

#: Module attributes that are a mode, not the model: a model in eval mode is the same model.
_MODES = {"deterministic", "use_running_average", "training"}


def describe_value(value: Any) -> str | None:
  """A short, deterministic text of a static value, or None for what is not described."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return repr(value)
  if isinstance(value, Activation):
    return f"activation {value.name}"
  if isinstance(value, (np.dtype, type(np.float32))) or (isinstance(value, type) and issubclass(value, np.generic)):
    return str(np.dtype(value))
  if isinstance(value, functools.partial):
    inner = [describe_value(value.func), *map(describe_value, value.args), *(f"{k}={describe_value(v)}" for k, v in sorted(value.keywords.items()))]
    return f"partial({', '.join(str(t) for t in inner)})"
  if inspect.isfunction(value) or inspect.isbuiltin(value) or isinstance(value, type):
    return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
  if isinstance(value, (tuple, list)):
    parts = [describe_value(v) for v in value]
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
      text = describe_value(value)
      if text is not None:
        out[f"{where}:{name}"] = text
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    array = value.get_value() if hasattr(value, "get_value") else value
    out[f"{'/'.join(map(str, path))}:param"] = f"{array.dtype}{tuple(array.shape)}"
  return out
