"""`altgrad bench --suite perf`: what one training step of each rule costs against backprop's.

Every case is one jitted step (rule, then ``optax.sgd``) on one batch passed as an argument, at a
shape of the benchmark settings in docs/rules/node_perturbation.rst, consequentialism.rst and target_propagation.rst or an ordinary NNX model. Per case:
the median step time (cases of a shape are timed in turn, round after round, so that a drift of
the machine hits them alike), the time to trace and compile the step, the FLOPs and peak device
memory of the compiled step (XLA's cost and memory analyses: arguments, outputs and temporaries,
not the process's resident memory) and its FLOP rate against a matmul's measured in the same
run. Each is divided by the backprop case's at the same shape.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altgrad import _distributed, losses
from altgrad import data as data_lib
from altgrad._bench._controls import BENCH_RULES
from altgrad._bench._environment import environment
from altgrad._bench._experiment import build_model, make_rule
from altgrad._bench._suites import BASELINES


@dataclasses.dataclass(frozen=True)
class Shape:
  """A model and a batch: ``build(seed, decorrelation) -> (model, inputs, targets, loss_fn)``."""

  name: str
  build: Callable[..., tuple[nnx.Module, Any, Any, Callable]]


@dataclasses.dataclass(frozen=True)
class Case:
  """One rule at one shape; ``decorrelation = (lr, sample)`` gives the model's Dense layers a
  decorrelating matrix."""

  shape: Shape
  rule: str
  options: tuple[tuple[str, Any], ...] = ()
  decorrelation: tuple[float, float] | None = None

  @property
  def label(self) -> str:
    options = ", ".join(f"{k}={v}" for k, v in self.options)
    rule = f"{self.rule} ({options})" if options else self.rule
    if self.decorrelation:
      lr, sample = self.decorrelation
      rule = f"decorrelated {rule} (lr {lr:g}, sample {sample:g})"
    return rule


def _shape(
  name: str,
  kind: str,
  input_shape: tuple[int, ...],
  classes: int,
  batch: int,
  hidden: tuple[int, ...],
  activation: str = "tanh",
  tokens: bool = False,
) -> Shape:
  """The model ``build_model`` makes of ``kind`` (as `compare` and `bench` train it) for inputs of
  ``input_shape`` (token ids below ``classes`` if ``tokens``), on a random batch with random labels."""
  blank, labels = np.zeros((1, *input_shape), np.int32 if tokens else np.float32), np.zeros((1,), np.int32)
  layout = data_lib.Dataset(blank, labels, blank, labels, classes, name)

  def build(seed, decorrelation=None):
    lr, sample = decorrelation or (None, 1.0)
    model = build_model(layout, kind, hidden, activation, seed, lr, sample)
    key = jax.random.key(seed + 1)
    shape = (batch, *input_shape)
    x = jax.random.randint(key, shape, 0, classes) if tokens else jax.random.normal(key, shape)
    y = jax.random.randint(jax.random.key(seed + 2), (batch,), 0, classes)
    return model, x, y, losses.softmax_cross_entropy

  return Shape(f"{name}, batch {batch}", build)


def cases() -> list[Case]:
  """The perf suite: issue 15's shapes, every rule that has a cost target there."""
  danp = _shape("MLP 3072-1024x3-10", "mlp", (3072,), 10, 1000, (1024,) * 3, "leaky_relu")
  found = [Case(danp, rule) for rule in ("backprop", "np", "anp", "inp", "consequentialism", *BASELINES)]
  found += [Case(danp, rule, decorrelation=(1e-3, s)) for rule in ("backprop", "anp") for s in (1.0, 0.1)]
  for shape in (
    _shape("MLP 784-256x2-10", "mlp", (784,), 10, 128, (256, 256), "leaky_relu"),
    _shape("MLP 784-1024x2-10", "mlp", (784,), 10, 128, (1024, 1024), "leaky_relu"),
    _shape("conv 16-32 + MLP 128 on 28x28", "conv", (28, 28, 1), 10, 128, (128,), "relu"),
  ):
    found += [Case(shape, rule) for rule in ("backprop", "consequentialism")]
  for length, features, classes, batch in ((60, 6, 4, 20), (120, 6, 4, 20), (784, 1, 10, 16)):
    shape = _shape(f"RNN 100, T={length}", "rnn", (length, features), classes, batch, (100,))
    found += [Case(shape, "backprop"), Case(shape, "tp", (("reg", 1.0),))]
  for length in (60, 120):  # TP on Flax's nnx.RNN against BPTT, beside altgrad's own cells
    for kind, name in (("flax_rnn", "nnx.RNN(SimpleCell)"), ("gru", "GRU"), ("flax_gru", "nnx.RNN(GRUCell)"), ("flax_lstm", "nnx.RNN(LSTMCell)")):
      shape = _shape(f"{name} 100, T={length}", kind, (length, 6), 4, 20, (100,))
      found += [Case(shape, "backprop"), Case(shape, "tp", (("reg", 1.0),))]
  user_models = (  # the user-model path (TP needs altgrad layers), decorrelated by nn.decorrelate
    _shape("NNX ResNet 16x1 (BatchNorm, dropout) on 28x28", "resnet", (28, 28, 1), 10, 128, (16,), "relu"),
    _shape("NNX transformer 32x2 on 16 tokens", "transformer", (16,), 8, 64, (32, 32), "gelu", tokens=True),
  )
  for shape in user_models:
    found += [Case(shape, rule) for rule in ("jax_grad", "backprop", "consequentialism", "np", "anp", "inp", *BASELINES)]
    found += [Case(shape, rule, decorrelation=(1e-3, s)) for rule in ("backprop", "anp") for s in (1.0, 0.1)]
  return found


def largest_constant(hlo: str) -> int:
  """Elements of the largest array constant in compiled HLO text. Data closed over by a step
  instead of passed to it becomes such a constant, and XLA may fold whole products of it at
  compile time (a large Gram matrix can take minutes)."""
  shapes = re.findall(r"=\s*\w+\[([\d,]*)\](?:\{[\d,]*\})?\s+constant\(", hlo)
  return max((math.prod(int(d) for d in shape.split(",") if d) for shape in shapes), default=0)


def inverse_cdf_copies(hlo: str) -> int:
  """Copies of ``erf_inv``'s polynomial in compiled HLO text: the fewest occurrences of any
  coefficient a lone ``erf_inv`` holds once (each fused reader of unstored noise holds one)."""
  lone = jax.jit(jax.lax.erf_inv).lower(jnp.ones(8)).compile().as_text()
  found = collections.Counter(re.findall(r"constant\((-?\d+\.\d{4,}[e\d+-]*)\)", lone))
  return min(hlo.count(f"constant({c})") for c, n in found.items() if n == 1)


class UncountedFlops(NamedTuple):
  """FLOPs of a step that XLA's cost analysis leaves out, read from the traced step."""

  library: float  # LAPACK calls: XLA counts nothing of a library call
  loops: float  # a loop's products after its first trip: XLA counts a loop's body once


def _dot_flops(eqn) -> float:
  (_, rhs_contracting), (_, rhs_batch) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  kept = [size for axis, size in enumerate(rhs) if axis not in (*rhs_contracting, *rhs_batch)]
  return 2.0 * math.prod(lhs) * math.prod(kept)


def _library_call_flops(eqn) -> float:
  """A Cholesky factor of ``n`` rows ``n^3 / 3``, a triangular solve of ``n`` rows for ``m``
  right sides ``n^2 m``, per matrix of a batch; 0 for any other operation."""
  shapes = [v.aval.shape for v in eqn.invars]
  if eqn.primitive.name == "cholesky":
    return math.prod(shapes[0][:-2]) * shapes[0][-1] ** 3 / 3
  if eqn.primitive.name == "triangular_solve":
    rhs = shapes[1]
    return math.prod(rhs[:-2]) * shapes[0][-1] ** 2 * rhs[-1 if eqn.params["left_side"] else -2]
  return 0.0


def uncounted_flops(jaxpr: jax.extend.core.Jaxpr, trips: int = 1, counted: int = 1) -> UncountedFlops:
  """What XLA's count of a compiled step leaves out: every LAPACK call's FLOPs, and the matrix
  products of a scan's trips but those XLA counts (its body once, or the unrolled copies of it).
  ``trips`` and ``counted`` are the enclosing scans' true and counted trips; a cond counts its
  dearest branch, a ``while_loop`` of unknown length its body once (as XLA does)."""
  library = loops = 0.0
  for eqn in jaxpr.eqns:
    library += trips * _library_call_flops(eqn)
    if eqn.primitive.name == "dot_general":
      loops += (trips - counted) * _dot_flops(eqn)
    inner = (trips, counted)
    if eqn.primitive.name == "scan":
      length, unroll = eqn.params["length"], eqn.params.get("unroll", 1)
      inner = (trips * length, counted * (length if unroll is True else max(1, min(int(unroll), length))))
    for value in eqn.params.values():
      bodies = [getattr(v, "jaxpr", v) for v in (value if isinstance(value, (list, tuple)) else [value])]
      costs = [uncounted_flops(j, *inner) for j in bodies if isinstance(j, jax.extend.core.Jaxpr)]
      if costs:
        library += max(c.library for c in costs)
        loops += max(c.loops for c in costs)
  return UncountedFlops(library, loops)


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a float32 ``(size, size)`` matmul on the default device: the roofline."""
  a = jax.random.normal(jax.random.key(0), (size, size))
  product = jax.jit(jnp.matmul).lower(a, a).compile()
  product(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    product(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / float(np.median(times))


class _Compiled:
  """A case's compiled step, its inputs and what XLA says of it."""

  def __init__(self, case: Case, seed: int = 0):
    model, x, y, loss_fn = case.shape.build(seed, case.decorrelation)
    rule = make_rule(case.rule, model, loss_fn, seed, x.shape[0], registry=BENCH_RULES, **dict(case.options))
    tx = optax.chain(rule, optax.sgd(1e-3))
    params = nnx.state(model, nnx.Param)

    def step(params, state, x, y):
      updates, state = tx.update(None, state, params, batch=(x, y))
      return optax.apply_updates(params, updates), state

    self.args = (params, tx.init(params), x, y)
    self._step_fn, self.trace_times, self.compile_times = step, [], []
    traced = self.compile()
    cost = self.step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # one dict per device in older JAX
    self.flops = float((cost or {}).get("flops", float("nan")))
    self.uncounted = uncounted_flops(traced.jaxpr.jaxpr)
    memory = self.step.memory_analysis()
    # XLA:CPU's peak_memory_in_bytes is the same for every rule at a shape, so: all buffers
    self.peak_bytes = (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      + memory.temp_size_in_bytes
      - memory.alias_size_in_bytes
    )
    self.largest_constant = largest_constant(self.step.as_text())
    self.times: list[float] = []

  def compile(self) -> jax.stages.Traced:
    """Traces, lowers and compiles the step afresh (a new function, so no cache answers), and
    records the seconds of the trace and lowering and of XLA's compile."""
    start = time.perf_counter()
    traced = jax.jit(lambda *args: self._step_fn(*args)).trace(*self.args)
    lowered = traced.lower()
    middle = time.perf_counter()
    self.step = lowered.compile()
    self.trace_times.append(middle - start)
    self.compile_times.append(time.perf_counter() - middle)
    return traced

  @property
  def trace_seconds(self) -> float:
    return float(np.median(self.trace_times))

  @property
  def compile_seconds(self) -> float:
    return float(np.median(self.compile_times))

  def time(self, steps: int) -> None:
    """Runs ``steps`` steps from the same inputs; records the mean time of one."""
    start = time.perf_counter()
    for _ in range(steps):
      out = self.step(*self.args)
    jax.block_until_ready(out)
    self.times.append((time.perf_counter() - start) / steps)


def measure(
  found: list[Case], *, rounds: int = 7, round_seconds: float = 0.3, compiles: int = 3, progress: bool = False
) -> dict:
  """Compiles (``compiles`` times, the cases of a shape in turn: one compile's time moves by a
  fifth between runs) and times every case; records per case (median compile), and ratios to
  the same shape's backprop."""
  records = {}
  shapes = list(dict.fromkeys(case.shape for case in found))
  from tqdm.auto import tqdm

  for shape in tqdm(shapes, desc="bench perf", unit="shape", disable=not progress):
    group = [case for case in found if case.shape == shape]
    compiled = [_Compiled(case) for case in group]
    for _ in range(compiles - 1):
      for c in compiled:
        c.compile()
    for c in compiled:
      c.time(1)  # warm up, then one step to size the rounds
      c.time(1)
    steps = [max(1, round(round_seconds / max(c.times[-1], 1e-6))) for c in compiled]
    for c in compiled:
      c.times.clear()
    for _ in range(rounds):
      for c, n in zip(compiled, steps, strict=True):
        c.time(n)
    reference = next(c for case, c in zip(group, compiled, strict=True) if case.rule == "backprop" and not case.decorrelation)
    for case, c in zip(group, compiled, strict=True):
      seconds = float(np.median(c.times))
      records[f"{shape.name} / {case.label}"] = {
        "shape": shape.name,
        "rule": case.label,
        "step_seconds": seconds,
        "step_ratio": seconds / float(np.median(reference.times)),
        "trace_seconds": c.trace_seconds,
        "compile_seconds": c.compile_seconds,
        "compile_ratio": (c.trace_seconds + c.compile_seconds)
        / (reference.trace_seconds + reference.compile_seconds),
        "gflop": (c.flops + sum(c.uncounted)) / 1e9,
        "library_gflop": c.uncounted.library / 1e9,
        "loop_gflop": c.uncounted.loops / 1e9,
        "gflop_per_second": (c.flops + sum(c.uncounted)) / seconds / 1e9,
        "peak_mib": c.peak_bytes / 2**20,
        "largest_constant": c.largest_constant,
        "memory_ratio": c.peak_bytes / reference.peak_bytes,
      }
  return records


def run(out_dir: str | Path, *, found: list[Case] | None = None, progress: bool | None = None, **options) -> dict:
  """Measures the perf suite (or ``found``) and writes ``<out_dir>/perf.json`` and ``perf.md``."""
  rate = matmul_rate()
  records = measure(cases() if found is None else found, progress=progress is not False, **options)
  for record in records.values():
    record["roofline_fraction"] = record["gflop_per_second"] * 1e9 / rate
  results = {"suite": "perf", "environment": environment(), "matmul_gflop_per_second": rate / 1e9, "cases": records}
  if _distributed.is_primary():
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "perf.json").write_text(json.dumps(results, indent=1))
    (out_dir / "perf.md").write_text(markdown(results))
  return results


def markdown(results: dict) -> str:
  env = results["environment"]
  loops_counted = all("loop_gflop" in r for r in results["cases"].values())
  lines = [
    "# altgrad bench: perf",
    "",
    f"jax {env['jax']}, optax {env['optax']}, flax {env['flax']}; {env['device']} ({env['processor']}); "
    f"float32 matmul roofline {results['matmul_gflop_per_second']:.0f} GFLOP/s (2048^3, measured in this run).",
    "One jitted step (rule, then SGD), the batch passed as an argument; median over rounds in which the cases of "
    "a shape take turns. Compile = trace + XLA compile, the median of several compiles in turn (three by default). GFLOP is XLA's count of the compiled step plus "
    "what it leaves out, read from the traced step: its LAPACK calls' (Cholesky n^3/3, triangular solve n^2 m: XLA "
    "counts nothing of a library call) and a scan's matrix products after its first trip (XLA counts a loop's body "
    f"once{'' if loops_counted else '; not in this run, which predates that count'}); peak memory (arguments + outputs + temporaries of the step) XLA's analysis. Ratios divide by backprop's at the "
    "same shape in the same run. Largest constant in any step: "
    f"{max((r.get('largest_constant', 0) for r in results['cases'].values()), default=0)} elements (data "
    "closed over instead of passed would show here). The FLOP floor is the step's GFLOP over backprop's at "
    "the same shape, what the step would cost at backprop's FLOP rate; 'x floor' is the step-time ratio over "
    "it. Not on a GPU, where XLA's count leaves out the vendor libraries' products too.",
    "",
    "| shape | rule | ms/step | x backprop | FLOP floor | x floor | compile s | x backprop | GFLOP | GFLOP/s "
    "| of roofline | peak MiB | x backprop |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  cases = results["cases"].values()
  backprop = {r["shape"]: r["gflop"] for r in cases if r["rule"] == "backprop"}
  counted = env["device"].startswith("cpu")
  for r in cases:
    floor = r["gflop"] / backprop[r["shape"]] if counted and backprop.get(r["shape"]) else None
    floors = "- | -" if floor is None else f"{floor:.2f} | {r['step_ratio'] / floor:.2f}"
    lines.append(
      f"| {r['shape']} | {r['rule']} | {1e3 * r['step_seconds']:.2f} | {r['step_ratio']:.2f} | {floors} "
      f"| {r['trace_seconds'] + r['compile_seconds']:.2f} | {r['compile_ratio']:.2f} | {r['gflop']:.3f} "
      f"| {r['gflop_per_second']:.1f} | {r['roofline_fraction']:.0%} | {r['peak_mib']:.1f} | {r['memory_ratio']:.2f} |"
    )
  return "\n".join(lines) + "\n"
