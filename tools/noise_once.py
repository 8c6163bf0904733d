"""What storing node perturbation's noise saves: the perf suite's NP-family cases (and backprop)
at the authors' shape and on the NNX ResNet and transformer, timed and compiled in alternating
rounds with the Gaussian drawn in one fused expression (``_noise._CHUNKS = 1``: XLA removes a
loop of one trip and fuses the inverse CDF into every reader) and in altgrad's loop of two chunks
(stored once; the same numbers). Prints each case's median step and compile time ratio to
backprop's, its median compile seconds, and the copies of the inverse CDF in the compiled step.

    python tools/noise_once.py      # about 10 minutes on 2 CPU cores
"""

import contextlib
from unittest import mock

import numpy as np

from altgrad._bench import _perf
from altgrad.rules import _noise

RULES = ("backprop", "np", "anp", "inp")
SETTINGS = ("fused", "stored")


def fused_or_stored(setting: str):
  return mock.patch.object(_noise, "_CHUNKS", 1) if setting == "fused" else contextlib.nullcontext()


def main(repeats: int = 3) -> None:
  found = [c for c in _perf.cases() if c.rule in RULES and c.shape.name.startswith(("MLP 3072", "NNX"))]
  records, copies = {}, {}
  for setting in SETTINGS:
    with fused_or_stored(setting):
      for case in found:
        hlo = _perf._Compiled(case).step.as_text()
        copies.setdefault(f"{case.shape.name} / {case.label}", {})[setting] = _perf.inverse_cdf_copies(hlo)
  for setting in SETTINGS * repeats:
    with fused_or_stored(setting):
      for label, record in _perf.measure(found, rounds=5).items():
        records.setdefault(label, {}).setdefault(setting, []).append(record)
  cells = [f"{s}: x backprop step, compile | compile s | inverse CDFs" for s in SETTINGS]
  print("| case | " + " | ".join(cells) + " |")
  print("| --- |" + " --- | --- | --- |" * len(SETTINGS))
  for label, settings in records.items():
    row = []
    for setting in SETTINGS:
      runs = settings[setting]
      step, compile_ratio = (np.median([r[k] for r in runs]) for k in ("step_ratio", "compile_ratio"))
      seconds = np.median([r["trace_seconds"] + r["compile_seconds"] for r in runs])
      row += [f"{step:.2f}, {compile_ratio:.2f}", f"{seconds:.2f}", str(copies[label][setting])]
    print(f"| {label} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
  main()
