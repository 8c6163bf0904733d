"""altgrad: learning rules that replace or repair backpropagation, as optax transformations.

The submodules load when first used (``altgrad.rules``, ``from altgrad import nn``), so that the
command line can take over Ctrl-C before JAX is imported.
"""

import importlib

__version__ = "0.1.0"  # the one place it is written

__all__ = ["Optimizer", "data", "diagnostics", "losses", "nn", "rules", "train", "__version__"]
_SUBMODULES = {"data", "diagnostics", "losses", "nn", "rules", "train"}


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"altgrad.{name}")
  if name == "Optimizer":
    from altgrad._optimizer import Optimizer

    return Optimizer
  raise AttributeError(f"module 'altgrad' has no attribute {name!r}")


def __dir__():
  return sorted(__all__)
