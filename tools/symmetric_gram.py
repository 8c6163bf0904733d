"""Where a Gram matrix from its lower blocks beats the one product: ``X X^T`` for CW's design
rows at the authors' shape (1000 rows of 3073 and of 1025 features), the one product against
``altgrad._linalg.gram`` halving the rows down to 256, 128 and 64; then the perf suite's CW
cases at the authors' shape and the batch-128 MLPs, each step timed in alternating rounds with
and without halving (down to 256), with their compile times. Medians of 5 rounds; prints markdown.

    python tools/symmetric_gram.py      # about 3 minutes on 2 CPU cores
"""

import time
from unittest import mock

import jax
import numpy as np

from altgrad import _linalg
from altgrad._bench import _perf

SMALLEST = (None, 256, 128, 64)


def halving(smallest):
  """The Gram halved down to ``smallest`` rows on this backend (never, for None)."""
  table = {} if smallest is None else {jax.default_backend(): smallest}
  return mock.patch.object(_linalg, "GRAM_HALF_ROWS", table)


def product_ms(features: int, smallest, repeats: int = 20) -> float:
  x = jax.random.normal(jax.random.key(0), (1000, features))
  with halving(smallest):
    step = jax.jit(lambda rows: _linalg.gram(rows)).lower(x).compile()  # a new function: no cached trace
  step(x).block_until_ready()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(repeats):
      out = step(x)
    out.block_until_ready()
    times.append((time.perf_counter() - start) / repeats)
  return 1e3 * float(np.median(times))


def main() -> None:
  print("| rows x features | one product ms | " + " | ".join(f"halved to {s} ms" for s in SMALLEST[1:]) + " |")
  print("| --- |" + " --- |" * len(SMALLEST))
  for features in (3073, 1025):
    print(f"| 1000 x {features} | " + " | ".join(f"{product_ms(features, s):.1f}" for s in SMALLEST) + " |")
  found = [c for c in _perf.cases() if c.rule in ("backprop", "consequentialism") and c.shape.name.startswith("MLP")]
  records = {}
  for smallest in (None, 256) * 3:
    with halving(smallest):
      for label, record in _perf.measure(found, rounds=5).items():
        records.setdefault(label, {}).setdefault(smallest, []).append(record)
  print("\n| case | one product: x backprop step, compile | halved to 256: x backprop step, compile |")
  print("| --- | --- | --- |")
  for label, runs in records.items():
    if label.endswith("consequentialism"):
      cells = [", ".join(f"{np.median([r[k] for r in runs[s]]):.2f}" for k in ("step_ratio", "compile_ratio")) for s in (None, 256)]
      print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
