"""What storing node perturbation's noise saves: the perf suite's NP-family cases (and backprop)
at the authors' shape and on the NNX ResNet and transformer, timed and compiled in alternating
rounds with altgrad's draw as it is (a loop over two chunks of columns, which XLA stores, each
hash's two words leaving it as one complex number) and as it was before (commit 7d1c6c6: one
expression, which XLA fuses into every reader of the noise; the same numbers to a float32
rounding). Prints each case's median step and compile time ratio to backprop's, its median
compile seconds and the copies of the inverse CDF in the compiled step, then a lone draw's
compile and run time. Run it in altgrad's git checkout (it reads the old draw from the history).

    python tools/noise_once.py      # about 12 minutes on 2 CPU cores
"""

import contextlib
import subprocess
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from altgrad._bench import _perf
from altgrad.rules import _noise

RULES = ("backprop", "np", "anp", "inp")
SETTINGS = ("before", "now")
BEFORE = "7d1c6c6"  # the last commit with the draw in one expression
LONE_DRAW = (1000, 3082)  # NP's noise at the authors' shape


def drawn(setting: str):
  """The draw as it is now, or as it was at :data:`BEFORE`."""
  if setting == "now":
    return contextlib.nullcontext()
  source = subprocess.run(["git", "show", f"{BEFORE}:altgrad/rules/_noise.py"], capture_output=True, text=True, check=True)
  before = {}
  exec(compile(source.stdout, f"{BEFORE}:altgrad/rules/_noise.py", "exec"), before)
  return mock.patch.object(_noise, "gaussian", before["gaussian"])


def lone_draw(repeats: int = 20) -> tuple[float, float]:
  """Seconds to compile (best of 3) and to run (mean) one draw of :data:`LONE_DRAW`."""
  compile_times = []
  for _ in range(3):
    jax.clear_caches()
    start = time.perf_counter()
    draw = jax.jit(_noise.gaussian, static_argnums=(1, 2)).lower(jax.random.key(0), LONE_DRAW, jnp.float32).compile()
    compile_times.append(time.perf_counter() - start)
  draw(jax.random.key(0)).block_until_ready()
  start = time.perf_counter()
  for i in range(repeats):
    out = draw(jax.random.key(i))
  out.block_until_ready()
  return min(compile_times), (time.perf_counter() - start) / repeats


def main(repeats: int = 3) -> None:
  found = [c for c in _perf.cases() if c.rule in RULES and c.shape.name.startswith(("MLP 3072", "NNX"))]
  records, copies, lone = {}, {}, {}
  for setting in SETTINGS:
    with drawn(setting):
      lone[setting] = lone_draw()
      for case in found:
        hlo = _perf._Compiled(case).step.as_text()
        copies.setdefault(f"{case.shape.name} / {case.label}", {})[setting] = _perf.inverse_cdf_copies(hlo)
  for setting in SETTINGS * repeats:
    with drawn(setting):
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
    print(f"| {label} | " + " | ".join(row) + " |")
  for setting, (compile_seconds, run_seconds) in lone.items():
    print(f"\nA lone draw of {LONE_DRAW}, {setting}: compiles in {compile_seconds:.3f} s, runs in {1e3 * run_seconds:.2f} ms")


if __name__ == "__main__":
  main()
