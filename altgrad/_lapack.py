"""jaxlib's LAPACK calls on the CPU run on one OpenBLAS thread, in any training loop.

A CPU step runs its matmuls on XLA's thread pool and its LAPACK calls (consequentialism's
Cholesky factors and solves, target propagation's and Expectation Reflection's ridge solves) on
the OpenBLAS that SciPy ships, whose routines jaxlib calls. OpenBLAS's threads keep spinning
after each call and take the cores from XLA's (``tools/lapack_threads.py`` measures it:
results/lapack_threads.md). So building a rule that calls LAPACK sets that library to one
thread, once per process, whatever loop trains with it; NumPy's own BLAS (a separate library in
pip's wheels) keeps its threads.
"""

from __future__ import annotations

import os

import jax

_DONE = False


def _scipy_blas() -> list:
  """threadpoolctl's controllers of the BLAS libraries that SciPy's LAPACK wrappers load."""
  import scipy
  import scipy.linalg  # noqa: F401  (loads the library behind jaxlib's LAPACK kernels)
  import threadpoolctl

  home = os.path.dirname(os.path.dirname(scipy.__file__))
  return [
    c
    for c in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
    if os.path.realpath(c.filepath).startswith(os.path.realpath(home) + os.sep)
    and os.path.basename(os.path.dirname(c.filepath)).startswith("scipy")
  ]


def single_threaded_lapack() -> None:
  """On XLA's CPU backend, sets the OpenBLAS behind jaxlib's LAPACK calls (SciPy's) to one
  thread for the rest of the process; elsewhere, and after the first call, does nothing. Called
  when a rule that factors or solves is built; ``threadpoolctl.threadpool_limits`` sets it back."""
  global _DONE
  if _DONE or jax.default_backend() != "cpu":
    return
  for controller in _scipy_blas():
    controller.set_num_threads(1)
  _DONE = True
