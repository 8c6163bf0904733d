"""Several processes as one data-parallel run, on JAX's multi-controller runtime.

Every process runs the same command on the same data; ``jax.distributed.initialize`` joins them
into one set of devices (``jax.devices()`` spans all processes), and ``train.fit(...,
data_parallel=True)`` shards each global batch over all of them. This module sets that up for the
command line: joining with a bounded wait and a clear error (JAX itself aborts the process when
the coordinator never answers), and launching N local processes to try it on one machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import jax

from altgrad import _interrupt

#: ``--coordinator`` value that lets JAX find the cluster itself (TPU slices, SLURM, Open MPI).
AUTO = "auto"


def is_primary() -> bool:
  """Whether this process prints and writes files: process 0 (or the only one)."""
  return jax.process_index() == 0


def initialize(coordinator: str, num_processes: int | None, process_id: int | None, timeout: float) -> None:
  """Joins this process to the others: ``coordinator`` is ``host:port`` of process 0 (which
  serves there), or :data:`AUTO`. Processes other than 0 first wait up to ``timeout`` seconds for
  the coordinator to accept connections, and raise ``ConnectionError`` if it does not."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  if coordinator == AUTO:
    jax.distributed.initialize(initialization_timeout=int(timeout))
    return
  if num_processes is None or process_id is None:
    raise ValueError("--coordinator HOST:PORT needs --num-processes and --process-id")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process-id must lie in [0, {num_processes}), got {process_id}")
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator must be HOST:PORT or {AUTO!r}, got {coordinator!r}")
  if process_id != 0:
    _wait_for(host, int(port), timeout, process_id)
  jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=int(timeout))
  if is_primary():  # on stderr, unbuffered: the run's one sign that every process joined
    print(f"altgrad: {jax.process_count()} processes joined, {jax.device_count()} devices", file=sys.stderr, flush=True)


def _wait_for(host: str, port: int, timeout: float, process_id: int) -> None:
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, port), timeout=1.0):
        return
    except OSError:
      if time.monotonic() > deadline:
        raise ConnectionError(
          f"process {process_id}: no coordinator answered at {host}:{port} within {timeout:g} s; "
          "start process 0 (it serves the coordinator) or check --coordinator"
        ) from None
      time.sleep(0.2)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


#: Set in the processes :func:`launch_local` starts: the launcher's process id (they end with it).
LAUNCHER = "ALTGRAD_LAUNCHER_PID"
#: Seconds a stopped process has to end after SIGTERM before it is killed.
GRACE = 1.0


def launch_local(argv: Sequence[str], processes: int, timeout: float) -> int:
  """Runs ``altgrad *argv`` as ``processes`` local processes joined through a coordinator on
  127.0.0.1 and returns the first non-zero exit status (0 if all succeed). When one process fails
  the others are stopped at once (a peer would wait for it in a collective), and so are all of
  them when the launcher is interrupted or ends (no orphans)."""
  coordinator = f"127.0.0.1:{free_port()}"
  children = [
    subprocess.Popen(
      [sys.executable, "-m", "altgrad", *argv, "--coordinator", coordinator]
      + ["--num-processes", str(processes), "--process-id", str(i), "--init-timeout", f"{timeout:g}"],
      env=os.environ | {LAUNCHER: str(os.getpid())},
    )
    for i in range(processes)
  ]
  try:
    while True:
      _interrupt.check()
      codes = [child.poll() for child in children]  # every child's (any() would stop at the first running)
      failed = [code for code in codes if code not in (None, 0)]
      if failed:
        return _exit_status(failed[0])
      if None not in codes:
        return 0
      time.sleep(0.1)
  finally:
    _stop(children)


def _exit_status(returncode: int) -> int:
  """A child's status as a process's exit status (128 + the signal that ended it)."""
  return 128 - returncode if returncode < 0 else returncode


def _stop(children: Sequence[subprocess.Popen]) -> None:
  """Ends every child still running: SIGTERM, then SIGKILL after :data:`GRACE` seconds."""
  running = [c for c in children if c.poll() is None]
  for child in running:
    child.terminate()
  deadline = time.monotonic() + GRACE
  for child in running:
    try:
      child.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()
