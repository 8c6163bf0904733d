"""Where the time of the perf suite's steps goes: for the cases whose targets are not met (and
backprop at their shapes), each compiled step run under ``jax.profiler`` and its XLA:CPU thunks'
time summed by the kind of HLO instruction they run (matrix products, LAPACK calls, elementwise
and reduction kernels, copies and transposes; a loop's ops are counted in its body, not again
as the loop), then one compile under the profiler: how many kernels XLA compiled and the time
spent compiling them (``FusionCompiler::Compile``) against the whole compile. Writes
results/profiles.md.

    python tools/profile_steps.py      # about 3 minutes on 2 CPU cores

Kernel times are summed over XLA's threads (two on this machine kind): their sum can pass the
step's wall-clock time where kernels overlap. The profiler slows small kernels; compare shares
between cases, not milliseconds with results/perf.md.
"""

import collections
import glob
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax

from altgrad._bench import _perf

ROOT = Path(__file__).resolve().parent.parent
STEPS = 10
CASES = (  # (shape prefix, case labels): the cases over a target in results/perf.md, with backprop
  (
    "MLP 3072-1024x3-10",
    (
      "backprop",
      "consequentialism",
      "anp",
      "inp",
      "decorrelated backprop (lr 0.001, sample 0.1)",
      "decorrelated anp (lr 0.001, sample 0.1)",
    ),
  ),
  ("MLP 784-256x2-10", ("backprop", "consequentialism")),
  ("NNX transformer", ("backprop", "np", "anp")),
)
KINDS = ("matrix products", "LAPACK", "elementwise and reductions", "copies and transposes", "other")


def instruction_kinds(hlo: str) -> dict[str, str]:
  """Each HLO instruction's kind, by its name (the name its thunk has in a profile)."""
  kinds = {}
  for name, opcode, rest in re.findall(r"%([\w.-]+) = .*? ([\w-]+)\((.*)", hlo):
    if opcode in ("dot", "convolution") or (opcode == "fusion" and "kind=kCustom" in rest):
      kinds[name] = "matrix products"
    elif opcode == "custom-call" and "lapack" in rest:
      kinds[name] = "LAPACK"
    elif opcode == "fusion" and ("kind=kLoop" in rest or "kind=kInput" in rest or "kind=kOutput" in rest):
      kinds[name] = "copies and transposes" if re.search(r"copy|transpose", name) else "elementwise and reductions"
    elif opcode in ("copy", "transpose"):
      kinds[name] = "copies and transposes"
    elif opcode in ("while", "conditional", "call"):
      kinds[name] = "loop"
    else:
      kinds[name] = "other"
  return kinds


def profiled(run, directory: str) -> tuple[collections.Counter, collections.Counter]:
  """Summed duration (microseconds) and count of each event ``run()`` records."""
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    run()
  trace = sorted(glob.glob(f"{directory}/**/*perfetto_trace.json.gz", recursive=True))[-1]
  with gzip.open(trace) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals, counts = collections.Counter(), collections.Counter()
  for event in events:
    if event.get("ph") == "X":
      totals[event["name"]] += event.get("dur", 0)
      counts[event["name"]] += 1
  return totals, counts


def profile(case) -> dict:
  compiled = _perf._Compiled(case)
  compiled.time(3)
  kinds = instruction_kinds(compiled.step.as_text())
  with tempfile.TemporaryDirectory() as directory:
    totals, _ = profiled(lambda: compiled.time(STEPS), directory + "/run")
    compile_totals, compile_counts = profiled(compiled.compile, directory + "/compile")
  by_kind = collections.Counter()
  for name, micros in totals.items():
    kind = kinds.get(name)
    if kind is not None and kind != "loop":
      by_kind[kind] += micros / STEPS / 1e3
  return {
    "step_ms": 1e3 * compiled.times[-1],
    "kernel_ms": dict(by_kind),
    "compile_s": compiled.compile_times[-1] + compiled.trace_times[-1],
    "kernels_compiled": compile_counts["FusionCompiler::Compile"],
    "kernel_compile_s": compile_totals["FusionCompiler::Compile"] / 1e6,
  }


def markdown(records: dict) -> str:
  lines = [
    "# Where the perf suite's steps spend their time: `python tools/profile_steps.py`",
    "",
    f"jax {jax.__version__}, {jax.devices()[0].platform}; {STEPS} steps per case under `jax.profiler`, then one "
    "compile. Kernel milliseconds per step are summed over XLA's threads by the kind of HLO instruction "
    "(a loop's body counted once per trip, the loop itself not); 'kernels compiled' counts XLA:CPU's "
    "`FusionCompiler::Compile` calls, one per generated kernel, and their seconds.",
    "",
    "| case | profiled ms/step | " + " | ".join(f"{k} ms" for k in KINDS) + " | compile s | kernels compiled "
    "| their compile s |",
    "| --- | --- | " + " | ".join("---" for _ in KINDS) + " | --- | --- | --- |",
  ]
  for label, r in records.items():
    kernel = " | ".join(f"{r['kernel_ms'].get(k, 0.0):.2f}" for k in KINDS)
    lines.append(
      f"| {label} | {r['step_ms']:.2f} | {kernel} | {r['compile_s']:.2f} | {r['kernels_compiled']} "
      f"| {r['kernel_compile_s']:.2f} |"
    )
  return "\n".join(lines) + "\n"


def main() -> None:
  records = {}
  for prefix, labels in CASES:
    for case in _perf.cases():
      if case.shape.name.startswith(prefix) and case.label in labels:
        records[f"{case.shape.name} / {case.label}"] = profile(case)
        print(f"{case.shape.name} / {case.label}: done", flush=True)
  (ROOT / "results" / "profiles.md").write_text(markdown(records))
  print("results/profiles.md written")


if __name__ == "__main__":
  main()
