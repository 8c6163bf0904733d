"""``fit``'s checkpoints: Orbax after every epoch, with a description of the run they belong to
(refused by name when another run tries to resume them) and one writer per directory; and the
resumption of a run from its latest checkpoint."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from altgrad import __version__, _distributed, _identity
from altgrad._identity import differences
from altgrad.nn._signature import model_signature

if TYPE_CHECKING:
  from altgrad.train._history import History
  from altgrad.train._runs import Settings

#: The file in a checkpoint directory that its writer holds a lock on.
LOCK_FILE = ".altgrad-writer"


class Checkpoints:
  """The checkpoints of one run in ``directory``; ``run`` describes the run (see
  ``altgrad._identity``), ``resume_anyway`` continues a checkpoint of a run described otherwise."""

  def __init__(self, directory: str | Path, run: dict[str, Any], *, resume_anyway: bool = False):
    import orbax.checkpoint as ocp

    path = Path(directory).absolute()
    if path.exists() and not path.is_dir():
      raise ValueError(f"checkpoint_dir {path} is a file, not a directory: give a directory (it is created)")
    try:
      path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
      raise ValueError(f"checkpoint_dir {path} cannot be created: {error.strerror}") from None
    self._ocp, self.directory, self.run, self.resume_anyway = ocp, path, run, resume_anyway
    self._lock = _hold_lock(path) if _distributed.is_primary() else None
    try:
      self.manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=1))
      self.histories = None if self.latest() is None else self._read_run()  # fails fast, before compiling
    except BaseException:
      self._release()
      raise

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, epoch: int, params, opt_state, histories: Sequence[Any]) -> None:
    ocp = self._ocp
    record = {"run": self.run, "histories": [dataclasses.asdict(h) for h in histories]}
    self.manager.save(
      epoch,
      args=ocp.args.Composite(
        arrays=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
        record=ocp.args.JsonSave(record),
      ),
    )

  def _read_run(self) -> list:
    """The histories of the latest checkpoint, once its record is read and its run found to be
    this one (or ``resume_anyway``); an error that names the directory otherwise."""
    epoch = self.latest()
    try:
      record = self.manager.restore(epoch, args=self._ocp.args.Composite(record=self._ocp.args.JsonRestore()))["record"]
      histories = record["histories"]
    except Exception as error:
      raise ValueError(
        f"the checkpoint {self.directory / str(epoch)} cannot be read ({type(error).__name__}: {error}); "
        "delete it to start afresh, or give another checkpoint_dir"
      ) from None
    found = differences(record.get("run") or {"(the run)": "not described (an older altgrad)"}, self.run)
    if found and not self.resume_anyway:
      shown = "\n  ".join(found[:12]) + (f"\n  ... and {len(found) - 12} more" if len(found) > 12 else "")
      raise ValueError(
        f"the checkpoint in {self.directory} is of another run:\n  {shown}\nresume it with the run's "
        "settings, pass resume_anyway=True (--resume-anyway) to continue it with these, or give "
        "another checkpoint_dir"
      )
    if found:
      warnings.warn(f"resuming {self.directory} with other settings: " + "; ".join(found), stacklevel=4)
    return histories

  def restore(self, params, opt_state, epochs: int):
    """``(epoch, params, opt_state, histories)`` of the latest checkpoint, shaped like the given."""
    epoch = self.latest()
    if epoch > epochs:
      raise ValueError(f"the checkpoint in {self.directory} is at epoch {epoch}, beyond epochs={epochs}")
    target = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
    try:
      restored = self.manager.restore(epoch, args=self._ocp.args.Composite(arrays=self._ocp.args.StandardRestore(target)))
    except Exception as error:
      raise ValueError(
        f"the arrays of the checkpoint {self.directory / str(epoch)} do not fit this run's params and "
        f"state, or are damaged ({type(error).__name__}: {str(error)[:300]})"
      ) from None
    return epoch, restored["arrays"]["params"], restored["arrays"]["opt_state"], self.histories

  def close(self) -> None:
    try:
      self.manager.wait_until_finished()
      self.manager.close()
    finally:
      self._release()

  def _release(self) -> None:
    if self._lock is not None:
      os.close(self._lock)  # closing the file releases the lock
      self._lock = None


def _hold_lock(directory: Path) -> int:
  """A lock on ``directory``'s writer file, held until it is closed (or the process ends, which
  releases it whatever the way it ends); a second writer gets an error that names the first."""
  descriptor = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "another process"
    os.close(descriptor)
    raise ValueError(
      f"checkpoint_dir {directory} is being written by another run ({holder}); one run per "
      "directory: wait for it to finish, or give another checkpoint_dir"
    ) from None
  os.ftruncate(descriptor, 0)
  os.pwrite(descriptor, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
  return descriptor


@dataclasses.dataclass(frozen=True)
class Saving:
  """Where a run checkpoints, and whether it resumes a checkpoint of a run described otherwise."""

  directory: str | Path | None
  resume_anyway: bool

  def open(self, models, txs, data, seeds, settings: Settings, fresh_steps) -> Checkpoints | None:
    if self.directory is None:
      return None
    run = {
      "altgrad": __version__,
      "transformation": _identity.describe_transformation(txs[0]),
      "model": model_signature(models[0]),
      "data": _identity.data_signature(data),
      "batch_size": settings.batch_size,
      "seeds": list(seeds),
      "fresh_steps": fresh_steps,
    }
    return Checkpoints(self.directory, run, resume_anyway=self.resume_anyway)


def resume(checkpoints: Checkpoints | None, histories: list[History], params, opt_state, epochs: int):
  """``(first epoch to run, params, opt_state)``: from the latest checkpoint, its histories
  restored, or from the start."""
  if checkpoints is None or checkpoints.latest() is None:
    return 1, params, opt_state
  last, params, opt_state, saved = checkpoints.restore(params, opt_state, epochs)
  for h, s in zip(histories, saved, strict=True):
    for name, value in s.items():
      if name != "median_step_time":
        setattr(h, name, value)
  return last + 1, params, opt_state
