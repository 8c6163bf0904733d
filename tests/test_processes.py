"""Several processes as one data-parallel run (jax.distributed, CPU collectives over gloo): two
local processes of two CPU devices each against one process of four devices."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import XLA_FLAGS

from altgrad import _distributed

WORKER = Path(__file__).resolve().parent / "_processes_worker.py"
TIMEOUT = 300  # seconds: every wait is bounded
EPOCHS = 3  # of the checkpointed run, killed after its first checkpoint


def _env(devices):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return env | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{XLA_FLAGS} --xla_force_host_platform_device_count={devices}"}


def _launch(mode, out, *extra, processes=2):
  """Starts ``processes`` workers (two devices each) joined through a local coordinator, or the
  single-process reference on four devices."""
  coordinator = f"127.0.0.1:{_distributed.free_port()}"
  devices = 4 // processes
  return [
    subprocess.Popen(
      [sys.executable, str(WORKER), mode, str(out), coordinator, str(processes), str(i), *map(str, extra)],
      env=_env(devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]


def _finish(children):
  outputs = [child.communicate(timeout=TIMEOUT)[0] for child in children]
  for child, output in zip(children, outputs, strict=True):
    assert child.returncode == 0, output[-3000:]
  return outputs


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_after_a_kill(tmp_path):
  pair = _launch("rules", tmp_path / "pair.npz", EPOCHS)
  reference = _launch("reference", tmp_path / "one.npz", processes=1)
  outputs = _finish(pair)
  assert all("one-step updates equal" in o for o in outputs)
  assert all("batch_size 30 must divide by the 4 devices of 2 processes" in o for o in outputs)
  _finish(reference)
  pair, one = np.load(tmp_path / "pair.npz"), np.load(tmp_path / "one.npz")
  for name in ("backprop", "consequentialism", "er", "seeds"):
    np.testing.assert_allclose(pair[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)

  # kill both processes once a checkpoint is written, relaunch: the same params as the two processes'
  # run without a kill (ANP's two- and one-process runs agree step by step: check_one_step_updates;
  # over three epochs of noisy updates under Adam their float32 rounding parts by about 1e-5)
  checkpoints = tmp_path / "checkpoints"
  killed = _launch("resume", tmp_path / "resumed.npz", EPOCHS, checkpoints)
  deadline = time.monotonic() + TIMEOUT
  while not any(p.name.isdigit() for p in checkpoints.glob("*")) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert all(child.poll() is None for child in killed), "the run ended before it could be killed"
  for child in killed:
    child.kill()
    child.communicate(timeout=TIMEOUT)
  _finish(_launch("resume", tmp_path / "resumed.npz", EPOCHS, checkpoints))
  np.testing.assert_allclose(np.load(tmp_path / "resumed.npz")["anp"], pair["anp"], rtol=1e-6, atol=1e-7)


def test_a_missing_coordinator_is_a_clear_error_not_a_hang():
  port = _distributed.free_port()
  command = [sys.executable, "-m", "altgrad", "compare", "--coordinator", f"127.0.0.1:{port}"]
  command += ["--num-processes", "2", "--process-id", "1", "--init-timeout", "2"]
  start = time.monotonic()
  done = subprocess.run(command, env=_env(1), capture_output=True, text=True, timeout=60)
  assert done.returncode == 2 and time.monotonic() - start < 30
  assert f"no coordinator answered at 127.0.0.1:{port} within 2 s" in done.stderr


@pytest.mark.slow
def test_compare_starts_local_processes_and_only_process_0_reports(tmp_path):
  out = tmp_path / "compare.json"
  command = [sys.executable, "-m", "altgrad", "compare", "--processes", "2", "--rules", "backprop,er"]
  command += ["--hidden", "16", "--epochs", "1", "--plot", "", "--no-progress", "--json", str(out)]
  done = subprocess.run(command, env=_env(2), capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.count("test acc") == 1 and done.stdout.count(f"results written to {out}") == 1
  import json

  assert set(json.loads(out.read_text())["results"]) == {"backprop", "er"}
