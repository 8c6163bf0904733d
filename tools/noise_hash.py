"""What writing out the threefry hash saves node perturbation: the perf suite's NP, ANP and INP
cases (and backprop) at the authors' shape and on the NNX ResNet and transformer, timed and
compiled in alternating rounds with the noise hashed by JAX's ``threefry2x32`` primitive (a loop
over the rounds on CPU) and by altgrad's written-out hash (the same bits). Prints each case's
median step and compile time ratio to backprop's, and its median compile seconds.

    python tools/noise_hash.py      # about 8 minutes on 2 CPU cores
"""

import contextlib
from unittest import mock

import numpy as np
from jax.extend.random import threefry2x32_p

from altgrad._bench import _perf
from altgrad.rules import _noise

RULES = ("backprop", "np", "anp", "inp")
SETTINGS = ("primitive", "written out")


def primitive_hash(key, counters):
  return tuple(threefry2x32_p.bind(*key, *counters))


def main(repeats: int = 4) -> None:
  found = [c for c in _perf.cases() if c.rule in RULES and not c.decorrelation and c.shape.name.startswith(("MLP 3072", "NNX"))]
  records = {}
  for setting in SETTINGS * repeats:
    patch = mock.patch.object(_noise, "threefry2x32", primitive_hash)
    with patch if setting == "primitive" else contextlib.nullcontext():
      for label, record in _perf.measure(found, rounds=5).items():
        records.setdefault(label, {}).setdefault(setting, []).append(record)
  print("| case | " + " | ".join(f"{s}: x backprop step, compile | compile s" for s in SETTINGS) + " |")
  print("| --- |" + " --- | --- |" * len(SETTINGS))
  for label, settings in records.items():
    cells = []
    for setting in SETTINGS:
      runs = settings[setting]
      step, compile_ratio = (np.median([r[k] for r in runs]) for k in ("step_ratio", "compile_ratio"))
      seconds = np.median([r["trace_seconds"] + r["compile_seconds"] for r in runs])
      cells += [f"{step:.2f}, {compile_ratio:.2f}", f"{seconds:.2f}"]
    print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
