"""Ctrl-C in the command line: a clean stop at the next safe point, never a traceback.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread is: inside JAX's
tracing, a compilation, Orbax's writers or the interpreter's exit, which left tracebacks, lost
the interrupt or crashed the process. :func:`caught` replaces that, for the command line only:
the first Ctrl-C (or SIGTERM) asks for a stop, which ``fit`` honours between epochs (the last
one checkpointed) and ``bench`` between runs (the finished ones written); a second one stops at
once. A library user's own loop keeps Python's behaviour.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

_REQUESTED = threading.Event()
_KEPT: list[str] = []
#: Exit status of a run stopped by SIGINT (128 + the signal's number, as shells report it).
INTERRUPTED = 128 + signal.SIGINT


def requested() -> bool:
  """Whether a stop was asked for (a Ctrl-C was caught)."""
  return _REQUESTED.is_set()


def keep(what: str) -> None:
  """Says what a stopped command keeps (results so far, checkpoints), for its last line."""
  _KEPT.append(what)


def kept() -> str:
  """What the stopped command said it keeps."""
  return "; ".join(_KEPT) or "nothing had finished"


def check() -> None:
  """Raises ``KeyboardInterrupt`` at a safe point if a stop was asked for."""
  if _REQUESTED.is_set():
    raise KeyboardInterrupt


def _ask(signum: int, frame) -> None:
  del frame
  if _REQUESTED.is_set():  # the second: at once
    print(f"{os.path.basename(sys.argv[0]) or 'altgrad'}: interrupted again: stopped at once", file=sys.stderr)
    os._exit(128 + signum)
  _REQUESTED.set()


@contextlib.contextmanager
def caught() -> Iterator[None]:
  """Within the block, SIGINT and SIGTERM ask for a stop at the next :func:`check` (see above)."""
  previous = {s: signal.signal(s, _ask) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def stop_at_once(parent: int | None = None) -> None:
  """SIGINT and SIGTERM end this process at once, even while it waits in a collective (a worker
  of a multi-process run: a Python handler would run only when the wait returns); and, given the
  ``parent`` that launched it, so does that process's end (no orphan)."""
  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_DFL)
  if parent is not None:
    threading.Thread(target=_follow, args=(parent,), daemon=True, name="altgrad-parent").start()


def _follow(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(0.5)
  os._exit(128 + signal.SIGTERM)  # the launcher is gone
