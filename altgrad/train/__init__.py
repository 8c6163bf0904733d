"""A small training loop for any rule: one run, many seeds at once, on one device or many.

:func:`fit` trains one run, :func:`fit_seeds` one run per seed in a single compiled program;
both record a :class:`History`. :func:`tune` chooses hyperparameters on a validation split. The loop itself, in order, is ``altgrad/train/_loop.py``.
"""

from altgrad.train._devices import BATCH_AXIS
from altgrad.train._evaluate import REGRESSION_TOLERANCE, make_evaluate
from altgrad.train._fit import fit, fit_seeds
from altgrad.train._history import History, Probe
from altgrad.train._runs import epoch_order
from altgrad.train._tune import Tuning, tune

__all__ = [
  "BATCH_AXIS",
  "REGRESSION_TOLERANCE",
  "History",
  "Probe",
  "Tuning",
  "epoch_order",
  "fit",
  "fit_seeds",
  "make_evaluate",
  "tune",
]
