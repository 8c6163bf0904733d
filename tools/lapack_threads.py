"""What running jaxlib's LAPACK calls on one OpenBLAS thread saves on a CPU: the perf suite's
cases of the rules that call LAPACK in a step (consequentialism's Cholesky factors and solves,
target propagation's ridge inverse) and backprop at their shapes, timed in two rounds each with
OpenBLAS's threads as the process found them and under ``train.single_threaded_lapack()``.
Prints each case's median step time and its ratio to backprop's, with and without.

    python tools/lapack_threads.py      # about 6 minutes on 2 CPU cores
"""

import contextlib

from altgrad import _perf, train

RULES = ("backprop", "consequentialism", "tp")


def main() -> None:
  found = [c for c in _perf.cases() if c.rule in RULES and not c.decorrelation and "NNX" not in c.shape.name]
  timings = {}
  for setting in ("as found", "one thread", "as found", "one thread"):
    with train.single_threaded_lapack() if setting == "one thread" else contextlib.nullcontext():
      for label, record in _perf.measure(found, rounds=5).items():
        timings.setdefault(label, {}).setdefault(setting, []).append(record)
  print("| case | ms/step as found | x backprop | ms/step, LAPACK on one thread | x backprop |")
  print("| --- | --- | --- | --- | --- |")
  for label, settings in timings.items():
    cells = []
    for setting in ("as found", "one thread"):
      records = settings[setting]
      ms = ", ".join(f"{1e3 * r['step_seconds']:.1f}" for r in records)
      ratios = ", ".join(f"{r['step_ratio']:.2f}" for r in records)
      cells += [ms, ratios]
    print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
