"""Times a Cholesky factor and a solve with LAPACK's (or the vendor's) routines against altgrad's
blocked forms, per size and block, on the default backend, and then CW's whole step at the
node-perturbation authors' shape (four 1000 x 1000 dual solves) with the blocked forms off and
on, alternating; writes results/blocked_cholesky.md (or --out), from which
altgrad._linalg.BLOCKING is set for that backend.

    python tools/blocked_cholesky.py      # about 4 minutes on 2 CPU cores
"""

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from altgrad import _lapack, _linalg
from altgrad._bench import _perf

SIZES = (128, 256, 384, 512, 768, 1000, 1536, 2048)
BLOCKS = (64, 128, 256)


def _lapack_step(matrix, rhs):
  factor = jnp.linalg.cholesky(matrix)
  return jax.scipy.linalg.cho_solve((factor, True), rhs)


def _blocked_step(block):
  def step(matrix, rhs):
    factor = _linalg.blocked_cholesky(matrix, block)
    solved = _linalg.blocked_solve_lower(factor, rhs, block=block)
    return _linalg.blocked_solve_lower(factor, solved, transpose=True, block=block)

  return step


def _seconds(step, matrix, rhs, repeats):
  compiled = jax.jit(step).lower(matrix, rhs).compile()
  jax.block_until_ready(compiled(matrix, rhs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(matrix, rhs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _in_step(rounds: int) -> list[str]:
  """CW's and backprop's steps at the authors' shape, the blocked forms off and on in turn."""
  found = [
    c
    for c in _perf.cases()
    if c.shape.name.startswith("MLP 3072") and c.rule in ("backprop", "consequentialism") and c.decorrelation is None
  ]
  backend, saved = jax.default_backend(), _linalg.BLOCKING.get(jax.default_backend())
  blocked = _linalg.DEFAULT_BLOCKING if saved is None else saved
  lines = [
    "CW's whole step at the authors' shape (MLP 3072-1024x3-10, batch 1000; perf suite harness), the "
    f"blocked forms off and on ({blocked}), in turn:",
    "",
    "| solves | CW ms/step | x backprop | CW compile s | x backprop |",
    "| --- | --- | --- | --- | --- |",
  ]
  for setting in (None, blocked, None, blocked):
    _linalg.BLOCKING.pop(backend, None)
    if setting is not None:
      _linalg.BLOCKING[backend] = setting
    cw = next(r for r in _perf.measure(found, rounds=rounds).values() if r["rule"] == "consequentialism")
    lines.append(
      f"| {'blocked' if setting else 'LAPACK'} | {1e3 * cw['step_seconds']:.1f} | {cw['step_ratio']:.2f} "
      f"| {cw['compile_seconds']:.2f} | {cw['compile_ratio']:.2f} |"
    )
    print(lines[-1], flush=True)
  _linalg.BLOCKING.pop(backend, None)
  if saved is not None:
    _linalg.BLOCKING[backend] = saved
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results" / "blocked_cholesky.md"))
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  _lapack.single_threaded_lapack()  # as every rule that factors runs
  rng = np.random.default_rng(0)
  lines = [
    "# Blocked Cholesky against LAPACK: `python tools/blocked_cholesky.py`",
    "",
    f"jax {jax.__version__}, {jax.devices()[0]} ({jax.default_backend()}); median of {args.repeats} runs of one "
    "jitted factor of an n x n Gram (+ ridge) and a solve with n right-hand sides (CW's dual solve at batch n "
    "with n outputs), arguments passed; LAPACK on one thread, as the rules set it. Time in ms; the blocked "
    "columns' ratio is to LAPACK's.",
    "",
    "| n | LAPACK ms | " + " | ".join(f"blocks of {b}: ms (x LAPACK)" for b in BLOCKS) + " |",
    "| --- | --- | " + " | ".join("---" for _ in BLOCKS) + " |",
  ]
  for n in SIZES:
    x = rng.standard_normal((n, n // 2))
    gram = x @ x.T
    matrix = jnp.asarray(gram + 1e-2 * np.trace(gram) / n * np.eye(n), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    base = _seconds(_lapack_step, matrix, rhs, args.repeats)
    cells = []
    for block in BLOCKS:
      seconds = _seconds(_blocked_step(block), matrix, rhs, args.repeats) if block < n else float("nan")
      cells.append("-" if np.isnan(seconds) else f"{1e3 * seconds:.2f} ({seconds / base:.2f})")
    lines.append(f"| {n} | {1e3 * base:.2f} | " + " | ".join(cells) + " |")
    print(lines[-1], flush=True)
  lines += ["", *_in_step(args.repeats)]
  Path(args.out).write_text("\n".join(lines) + "\n")
  print("wrote", args.out)


if __name__ == "__main__":
  main()
