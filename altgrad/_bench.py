"""`altgrad bench`: named suites of training runs, compared with backprop in the same process.

A suite is a list of :class:`Run`. Every run's step time is divided by that of the backprop run
on the same data, model and batch size in the same suite. A run of several seeds trains them
together, vmapped in one compiled program, and reports their mean and spread. Results go to
``<out>/<suite>.json`` (resumable: finished runs are kept and skipped), ``<out>/<suite>.md`` and
``<out>/<suite>.png`` (test accuracy against epoch and against training time).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altgrad import _distributed, _interrupt, diagnostics, losses, nn, rules, train
from altgrad import data as data_lib
from altgrad._experiment import build_model, loss_for, make_rule, optimizer_for
from altgrad.nn._pure import param_path


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: data set, model, rule (with options), optimizer and schedule.

  ``seeds`` runs are trained together (seeds ``seed``, ``seed + 1``, ...; vmapped, or in turn in
  the same program with ``vectorize=False``), each seeding the initial params, the shuffling and
  the rule's key. With ``fresh_steps`` every epoch is that many batches freshly drawn by the
  task's sampler (an evaluation interval), not a pass over the training split.
  """

  dataset: str
  hidden: tuple[int, ...]
  rule: str
  optimizer: str
  lr: float
  epochs: int
  batch_size: int
  model: str = "auto"
  activation: str = "tanh"
  rule_options: tuple[tuple[str, object], ...] = ()
  dataset_options: tuple[tuple[str, object], ...] = ()
  seed: int = 0
  decorrelation_lr: float | None = None
  decorrelation_sample: float = 1.0
  kernel_init: str | None = None
  stop_on_discrepancy: bool = False
  seeds: int = 1
  vectorize: bool = True
  loss: str = "auto"
  fresh_steps: int | None = None

  @property
  def name(self) -> str:
    options = ",".join(f"{k}={v}" for k, v in self.rule_options)
    rule = f"{self.rule}({options})" if options else self.rule
    if self.decorrelation_lr is not None:
      sample = "" if self.decorrelation_sample == 1.0 else f",sample={self.decorrelation_sample:g}"
      rule = f"d{rule}(decor={self.decorrelation_lr:g}{sample})"
    if self.stop_on_discrepancy:
      rule += "+stop"
    if self.loss != "auto":
      rule += f"[{self.loss}]"
    hidden = "-".join(map(str, self.hidden)) + (f"({self.kernel_init})" if self.kernel_init else "")
    data = ",".join(f"{k}={v}" for k, v in self.dataset_options)
    data = f"{self.dataset}({data})" if data else self.dataset
    return (
      f"{data}/{self.model}:{hidden}/{self.activation}/b{self.batch_size}/{rule}+{self.optimizer}({self.lr:g})"
      f"/e{self.epochs}" + (f"x{self.fresh_steps}fresh" if self.fresh_steps else "")
      + f"/s{self.seed}" + (f"/n{self.seeds}" if self.seeds > 1 else "")
    )

  @property
  def reference_key(self) -> tuple:
    """Runs with the same key are timed against the same backprop run."""
    return (
      self.dataset,
      self.dataset_options,
      self.model,
      self.hidden,
      self.activation,
      self.batch_size,
      self.decorrelation_lr,
      self.decorrelation_sample,
      self.kernel_init,
      self.seeds,
    )


def _cw_suite(epochs: int) -> list[Run]:
  runs = []
  for hidden in ((256, 256), (1024, 1024)):
    for opt, lr_bp, lr_cw in (("sgd", 0.05, 0.5), ("momentum", 0.01, 0.05), ("adam", 1e-3, 1e-3)):
      runs.append(Run("fashion_mnist", hidden, "backprop", opt, lr_bp, epochs, 128))
      runs.append(Run("fashion_mnist", hidden, "consequentialism", opt, lr_cw, epochs, 128))
  conv_options = (("flatten", False),)
  for rule, lr in (("backprop", 1e-3), ("consequentialism", 1e-3)):
    runs.append(
      Run(
        "fashion_mnist",
        (128,),
        rule,
        "adam",
        lr,
        max(1, epochs // 2),
        128,
        model="conv",
        activation="relu",
        dataset_options=conv_options,
      )
    )
  return runs


def _np_suite() -> list[Run]:
  """The node-perturbation authors' settings (SanderDalm/DANP_open_source main.py defaults) on
  Fashion-MNIST: MLP 784-1024x3-10, leaky ReLU (slope 0.2, tf.nn.leaky_relu's), He-normal kernels,
  probability-space cross-entropy clipped to [1e-7, 1 - 1e-7], batch 1000, Adam 1e-3, noise
  sigma 1e-2, one noise sample, decorrelation lr 1e-3 on the whole batch; 20 epochs (the authors
  run 200), 3 seeds. Each rule with and without decorrelation."""
  runs = []
  for rule in ("backprop", "np", "inp", "anp"):
    options = () if rule == "backprop" else (("sigma", 1e-2),)
    for decorrelation_lr in (None, 1e-3):
      runs.append(
        Run(
          "fashion_mnist",
          (1024, 1024, 1024),
          rule,
          "adam",
          1e-3,
          20,
          1000,
          activation="leaky_relu",
          kernel_init="he_normal",
          loss="clipped_cross_entropy",
          rule_options=options,
          decorrelation_lr=decorrelation_lr,
          seeds=3,
        )
      )
  return runs


def _tp_suite() -> list[Run]:
  """docs/rules/target_propagation.rst, Benchmark settings: a tanh RNN of 100 units, TP (SGD gamma_theta; gamma_h, r) against BPTT (Nesterov)
  and against the control, BPTT at TP's step sizes (``scaled_backprop``), 3 seeds; the adding task
  in the authors' squared error (``mean_squared_error``). Temporal order at T = 60 and the adding
  task run the authors' budgets as they do: 40k, 48k and 24k iterations of fresh batches of 20,
  evaluated every 200.

  Not quite the authors' steps: torch's RNN cell has two biases (input and hidden), both moved by
  the same gradient, so the reference's effective bias step is twice altgrad's (one bias).
  """
  runs = []
  for length, epochs, fresh_steps, num_train, tp_options, tp_lr, bp_lr in (
    (60, 200, 200, 2_000, (("lr_target", 1e-2), ("reg", 10.0)), 0.1, 1e-5),
    (120, 240, 200, 2_000, (("lr_target", 1e-2), ("reg", 1.0)), 1e-2, 1e-5),
  ):
    sequences = functools.partial(
      Run, "temporal_order", (100,), epochs=epochs, batch_size=20, seeds=3, fresh_steps=fresh_steps,
      dataset_options=(("length", length), ("num_train", num_train), ("num_test", 2_000)),
    )
    runs.append(sequences(rule="backprop", optimizer="nesterov", lr=bp_lr))
    runs.append(sequences(rule="tp", optimizer="sgd", lr=tp_lr, rule_options=tp_options))
    # the control: BPTT at TP's step sizes (hidden layers at lr_target times the step)
    control = (("hidden_scale", dict(tp_options)["lr_target"]),)
    runs.append(sequences(rule="scaled_backprop", optimizer="sgd", lr=tp_lr, rule_options=control))
  # the authors' squared error is torch's MSELoss, twice altgrad's squared_error
  adding = functools.partial(
    Run, "adding", (100,), epochs=120, batch_size=20, seeds=3, loss="mean_squared_error", fresh_steps=200,
    dataset_options=(("length", 30), ("num_train", 2_000), ("num_test", 2_000)),
  )
  runs.append(adding(rule="backprop", optimizer="nesterov", lr=1e-3))
  runs.append(adding(rule="tp", optimizer="sgd", lr=0.1, rule_options=(("lr_target", 0.1), ("reg", 1.0))))
  # MNIST-1D as a 40-step sequence, with SGD settings after the paper's pixel-MNIST ones (both
  # rules diverged in results/tp.md: a setting to tune, not a comparison)
  sequence = (("as_sequence", True),)
  runs.append(Run("mnist1d", (100,), "backprop", "nesterov", 1e-3, 20, 16, dataset_options=sequence))
  runs.append(
    Run(
      "mnist1d",
      (100,),
      "tp",
      "sgd",
      0.1,
      20,
      16,
      rule_options=(("lr_target", 1e-2), ("reg", 1.0)),
      dataset_options=sequence,
    )
  )
  for length in (30, 60, 120, 240):  # step time against T, one epoch each
    options = (("length", length), ("num_train", 2_000), ("num_test", 200))
    runs.append(Run("temporal_order", (100,), "backprop", "nesterov", 1e-5, 1, 20, dataset_options=options))
    runs.append(
      Run(
        "temporal_order",
        (100,),
        "tp",
        "sgd",
        0.1,
        1,
        20,
        rule_options=(("reg", 1.0),),
        dataset_options=options,
      )
    )
  return runs


def _er_suite() -> list[Run]:
  """docs/rules/expectation_reflection.rst, Benchmark settings: full-batch ER, one sweep (3 seeds) and the reference stopping rule (one seed:
  it stops one run); ER on minibatches of 64 and 256 with moments streamed over the data set
  (3 seeds, 5 epochs; the hidden models also with the ratio hidden target); backprop with Adam
  (3 seeds)."""
  runs = []
  for dataset, size in (("fashion_mnist", 60_000), ("mnist1d", 4_000)):
    for hidden in ((), (256,), (256, 256)):
      # in turn: vmapped multilayer ER hangs XLA's CPU backend (train.fit_seeds says when)
      er = functools.partial(Run, dataset, hidden, "er", "sgd", 1.0, seeds=3, vectorize=False)
      runs.append(er(1, size))
      runs.append(Run(dataset, hidden, "er", "sgd", 1.0, 30, size, stop_on_discrepancy=True))
      runs.extend(er(5, batch_size) for batch_size in (64, 256))
      if hidden:
        runs.append(er(5, 64, rule_options=(("hidden_target", "ratio"),)))
      runs.append(Run(dataset, hidden, "backprop", "adam", 1e-3, 10, 128, seeds=3))
  return runs


def _models_suite() -> list[Run]:
  """Ordinary NNX models, as a user writes them (altgrad._zoo, no altgrad layers): a small ResNet
  (BatchNorm, dropout) on Fashion-MNIST and a small transformer (attention, tied head) on the
  majority task, trained with backprop, CW and ANP, and with plain ``jax.grad``, which times the
  backprop rule's overhead; then backprop, decorrelated backprop and DANP (``nn.decorrelate``:
  every Conv and Linear, decorrelation lr 1e-3 as the node-perturbation authors') over 3 seeds."""
  runs = []
  anp = ("anp", (("sigma", 1e-3),))
  for dataset, model, hidden, epochs, batch_size, lr, options in (
    ("fashion_mnist", "resnet", (16,), 2, 128, 3e-3, (("flatten", False),)),
    ("majority", "transformer", (32, 32), 10, 64, 1e-3, ()),
  ):
    setting = functools.partial(
      Run,
      dataset,
      hidden,
      optimizer="adam",
      lr=lr,
      epochs=epochs,
      batch_size=batch_size,
      model=model,
      activation="relu" if model == "resnet" else "gelu",
      dataset_options=options,
    )
    for rule, rule_options in (("jax_grad", ()), ("backprop", ()), ("consequentialism", ()), anp):
      runs.append(setting(rule=rule, rule_options=rule_options))
    runs.append(setting(rule="backprop", seeds=3))
    for rule, rule_options in (("backprop", ()), anp):
      runs.append(setting(rule=rule, rule_options=rule_options, decorrelation_lr=1e-3, seeds=3))
  return runs


def _conv_suite() -> list[Run]:
  """Every rule on one convolutional network, Fashion-MNIST images (28x28x1): altgrad's conv net
  (two 3x3 convolutions of stride 2, 16 and 32 channels, tanh, a dense layer of 128 and the
  classifier) with backprop, CW, ANP, decorrelated backprop and DANP (Adam 1e-3), TP (Adam 1e-3
  on its pseudo-gradients; linearized, the default) and ER (its own step, moments streamed over
  the data set); then the same network in plain NNX (``--model cnn``) with backprop, TP and ER.
  2 epochs of batches of 128, 3 seeds. TP and ER on convolutions are reconstructions (see their
  docstrings)."""
  runs = []
  images = (("flatten", False),)
  for model, cases in (
    ("conv", ("backprop", "consequentialism", "anp", "dbackprop", "danp", "tp", "er")),
    ("cnn", ("backprop", "tp", "er")),
  ):
    setting = functools.partial(
      Run, "fashion_mnist", (128,), epochs=2, batch_size=128, model=model, dataset_options=images, seeds=3
    )
    for case in cases:
      decorrelated = case in ("dbackprop", "danp")
      rule = case[1:] if decorrelated else case
      if rule == "er":  # in turn: vmapped multilayer ER hangs XLA's CPU backend (see the er suite)
        runs.append(setting(rule="er", optimizer="sgd", lr=1.0, vectorize=False))
        continue
      options = (("sigma", 1e-3),) if rule == "anp" else ()
      runs.append(
        setting(
          rule=rule,
          optimizer="adam",
          lr=1e-3,
          rule_options=options,
          decorrelation_lr=1e-3 if decorrelated else None,
        )
      )
  return runs


def _smoke_suite() -> list[Run]:
  """Every rule on digits, three seeds each, in well under two minutes on 2 CPU cores; ER also
  sweeps the full training set, as its reference does."""
  runs = [Run("digits", (64, 32), rule, "adam", 3e-3, 3, 64, seeds=3) for rule in rules.RULES if rule != "er"]
  full_batch = len(data_lib.load("digits").x_train)
  runs.append(Run("digits", (64, 32), "er", "sgd", 1.0, 3, 64, seeds=3))
  runs.append(Run("digits", (64, 32), "er", "sgd", 1.0, 3, full_batch, seeds=3))
  runs.append(Run("digits", (64, 32), "backprop", "adam", 3e-3, 30, full_batch, seeds=3))
  return runs


SUITES = {
  "smoke": _smoke_suite,
  "cw": lambda: _cw_suite(epochs=5),
  "np": _np_suite,
  "tp": _tp_suite,
  "er": _er_suite,
  "models": _models_suite,
  "conv": _conv_suite,
}
SUITES["all"] = lambda: [run for name in ("cw", "np", "tp", "er", "models", "conv") for run in SUITES[name]()]

class PlainGradientState(NamedTuple):
  loss: Any  # the mean loss of the step, as the rules log it
  model_variables: Any  # the model's non-param variables after the step (BatchNorm statistics, RNG counts)


def plain_gradient(model: nnx.Module, loss_fn) -> optax.GradientTransformationExtraArgs:
  """``jax.grad`` of the mean loss through the model as it is, with no sites: the plain training
  step of an NNX user, against which the backprop rule's overhead is timed."""
  graphdef, _, variables = nnx.split(model, nnx.Param, ...)

  def update_fn(updates, state, params=None, *, batch=None, **extra_args):
    del updates, extra_args
    x, targets = batch

    def mean_loss(p):
      bound = nnx.merge(graphdef, p, state.model_variables, copy=True)
      return jnp.mean(loss_fn(bound(x), targets)), nnx.split(bound, nnx.Param, ...)[2]

    (loss, variables), gradient = jax.value_and_grad(mean_loss, has_aux=True)(params)
    return gradient, PlainGradientState(loss, variables)

  return optax.GradientTransformationExtraArgs(lambda params: PlainGradientState(jnp.asarray(jnp.inf, jnp.float32), variables), update_fn)


def scaled_backprop(model: nnx.Module, loss_fn, *, hidden_scale: float) -> optax.GradientTransformationExtraArgs:
  """Backprop with the gradient of every param but the output layer's multiplied by
  ``hidden_scale``: BPTT at target propagation's step sizes (its hidden layers move by about
  ``lr_target`` times the optimizer's step, its output layer by the step), the control that
  separates TP's credit assignment from its step sizes."""
  if isinstance(model, (nn.SimpleRNN, nn.GRU)):
    output = ("readout",)
  elif isinstance(model, nn.Sequential):
    output = ("layers", len(model.layers) - 1)
  else:
    raise TypeError(f"scaled_backprop knows the output layer of a SimpleRNN, GRU or Sequential, not {type(model).__name__}")
  rule = rules.backprop(model, loss_fn)

  def scale(key_path, update):
    return update if param_path(key_path)[: len(output)] == output else hidden_scale * update

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = rule.update(updates, state, params, **extra_args)
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformationExtraArgs(rule.init, update_fn)


#: The rules a suite can name: altgrad's, ``jax_grad`` (:func:`plain_gradient`) and
#: ``scaled_backprop``.
BENCH_RULES = {**rules.RULES, "jax_grad": plain_gradient, "scaled_backprop": scaled_backprop}

#: How many training examples the per-layer cosine to backprop is measured on.
PROBE_SIZE = 256


def environment() -> dict:
  """The versions and the machine a suite ran with."""
  import flax

  return {
    "jax": jax.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "device": str(jax.devices()[0]),
    "device_count": jax.device_count(),
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
  }


def execute(run: Run, *, data_parallel: bool = False) -> dict:
  """Trains ``run`` and returns its record: the run's settings, the per-epoch mean (and spread
  over seeds) of accuracy and loss, step times, per-layer cosines to backprop and peak memory."""
  dataset = data_lib.load(run.dataset, **dict(run.dataset_options))
  loss_fn = loss_for(dataset) if run.loss == "auto" else getattr(losses, run.loss)
  built = {}

  def build(seed):
    model = build_model(
      dataset,
      run.model,
      run.hidden,
      run.activation,
      seed,
      run.decorrelation_lr,
      run.decorrelation_sample,
      run.kernel_init,
    )
    size = len(dataset.x_train)
    rule = make_rule(run.rule, model, loss_fn, seed, size, registry=BENCH_RULES, **dict(run.rule_options))
    built[seed] = (model, rule)
    return model, optax.chain(rule, optimizer_for(run.rule, run.optimizer, run.lr))

  seeds = [run.seed + i for i in range(run.seeds)]
  probe_batch = (dataset.x_train[:PROBE_SIZE], dataset.y_train[:PROBE_SIZE])

  def probe(params, opt_state):  # traced after build: any seed's rule has the same update
    model, rule = built[seeds[0]]
    return diagnostics.cosine_probe(model, loss_fn, rule, probe_batch)(params, opt_state)

  common = dict(
    loss_fn=loss_fn,
    epochs=run.epochs,
    batch_size=run.batch_size,
    progress=False,
    data_parallel=data_parallel,
    probe=probe,
    fresh_steps=run.fresh_steps,
  )
  if run.seeds == 1:
    model, tx = build(run.seed)
    histories = [
      train.fit(model, tx, dataset, seed=run.seed, stop_on_discrepancy=run.stop_on_discrepancy, **common)
    ]
  elif run.stop_on_discrepancy:
    raise ValueError(f"{run.name}: the stopping rule stops one run; give it seeds=1")
  else:
    histories = [h for _, h in train.fit_seeds(build, seeds, dataset, vectorize=run.vectorize, **common)]
  return dataclasses.asdict(run) | _summarize(histories) | {"name": run.name}


def _summarize(histories: list[train.History]) -> dict:
  """One record of the runs of several seeds: shared timings, per-epoch mean and spread."""
  first = histories[0].as_dict()
  record = {k: first[k] for k in ("epoch", "step_time", "wall_time", "compile_time", "compilations")}
  record["step_memory_mib"] = first["step_memory"] / 2**20
  if first["clipped_displacements"]:  # target propagation's guard: how often it fired, per epoch
    record["clipped_displacements"] = np.mean([h.clipped_displacements for h in histories], axis=0).tolist()
  record |= {"restored_epoch": first["restored_epoch"], "median_step_time": first["median_step_time"]}
  for key in ("train_loss", "test_loss", "test_accuracy"):
    values = np.array([getattr(h, key) for h in histories])
    record[key] = values.mean(axis=0).tolist()
    record[f"{key}_std"] = values.std(axis=0).tolist()
    record[f"{key}_seeds"] = values.tolist()
  record["probes"] = [
    {k: float(np.mean([h.probes[i][k] for h in histories])) for k in histories[0].probes[i]}
    for i in range(len(histories[0].probes))
  ]
  return record


def run_suite(
  suite: str, out_dir: str | Path, *, progress: bool | None = None, data_parallel: bool = False
) -> dict:
  """Runs (or resumes) ``suite``, writes its JSON, markdown and plot, and returns the results."""
  if suite not in SUITES:
    raise ValueError(f"unknown suite {suite!r}; expected one of {sorted(SUITES)}")
  out_dir = Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f"--out {out_dir} is a file: give a directory (it is created)")
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{suite}.json"
  previous = _previous(path)
  if previous and previous.get("data_parallel", False) != data_parallel:
    raise ValueError(
      f"{path} was run with data_parallel={previous.get('data_parallel', False)}; resume it the same way "
      "or write elsewhere (--out)"
    )
  runs = SUITES[suite]()
  missing_references = {r.reference_key for r in runs} - {
    r.reference_key for r in runs if r.rule == "backprop"
  }
  runs += [  # a backprop reference (Adam 1e-3) for every setting that has none
    dataclasses.replace(
      next(r for r in runs if r.reference_key == k),
      rule="backprop",
      rule_options=(),
      optimizer="adam",
      lr=1e-3,
      stop_on_discrepancy=False,
    )
    for k in missing_references
  ]
  here = environment()
  # the runs of the file this one resumes are kept, those the suite no longer lists included
  results = {"suite": suite, "environment": here, "data_parallel": data_parallel, "runs": dict(previous.get("runs", {}))}
  from tqdm.auto import tqdm

  primary = _distributed.is_primary()
  bar = tqdm(runs, desc=f"bench {suite}", unit="run", disable=progress is False or not primary)
  try:
    for run in bar:
      bar.set_postfix_str(run.name, refresh=True)
      if run.name in results["runs"]:
        continue
      _interrupt.check()  # a Ctrl-C: stop between runs, the finished ones written
      start = time.perf_counter()
      record = execute(run, data_parallel=data_parallel)
      results["runs"][run.name] = record | {"total_seconds": time.perf_counter() - start, "environment": here, "session": SESSION}
      if primary:  # several processes: process 0 writes
        path.write_text(json.dumps(results, indent=1))  # resumable after every run
  except KeyboardInterrupt:
    _interrupt.keep(f"{len(results['runs'])} finished run(s) in {path}; the same command resumes")
    raise
  _add_ratios(runs, results["runs"])
  if primary:
    path.write_text(json.dumps(results, indent=1))
    (out_dir / f"{suite}.md").write_text(markdown(results))
    try:
      plot(results, out_dir / f"{suite}.png")
    except Exception as error:  # matplotlib's errors are of many kinds; the JSON and markdown are written
      raise ValueError(f"{out_dir / f'{suite}.png'}: the plot failed ({type(error).__name__}: {error}); "
                       f"{path} and its markdown are written") from None
  return results


#: This process's bench session: step-time ratios divide by a reference of the same session.
SESSION = uuid.uuid4().hex


def _previous(path: Path) -> dict:
  """The results file a suite resumes (empty if there is none), or an error that names it."""
  if not path.exists():
    return {}
  try:
    previous = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is not a results file ({error}; cut short?): delete it to start over, or give another --out") from None
  if not isinstance(previous, dict) or not isinstance(previous.get("runs", {}), dict):
    raise ValueError(f"{path} is not a results file of altgrad bench: delete it, or give another --out")
  return previous


def _add_ratios(runs: list[Run], records: dict) -> None:
  """Divides each run's step time by backprop's with the same key, the same optimizer if there,
  where both were timed in one process; a ratio to a reference timed in another process on the
  same machine is marked as such, and none is made to one timed elsewhere."""
  backprop = [r for r in runs if r.rule == "backprop"]
  for r in runs:
    same_key = [b for b in backprop if b.reference_key == r.reference_key]
    run, reference = records[r.name], records[next((b for b in same_key if b.optimizer == r.optimizer), same_key[0]).name]
    machine = ("platform", "processor", "device")
    same_machine = all(run.get("environment", {}).get(k) == reference.get("environment", {}).get(k) for k in machine)
    run["step_time_ratio"] = run["median_step_time"] / reference["median_step_time"] if same_machine else None
    run["step_time_reference"] = (
      "this process" if run.get("session") == reference.get("session")
      else "another process, this machine" if same_machine else "another machine: no ratio"
    )


def _data_label(record: dict) -> str:
  options = ", ".join(
    f"{k}={v}" for k, v in record["dataset_options"] if k in ("length", "as_sequence", "flatten")
  )
  return f"{record['dataset']} ({options})" if options else record["dataset"]


def _rule_label(record: dict) -> str:
  options = ", ".join(f"{k}={v}" for k, v in record["rule_options"])
  rule = f"{record['rule']} ({options})" if options else record["rule"]
  if record.get("decorrelation_lr") is not None:
    rule = f"d{rule}, decorrelation lr {record['decorrelation_lr']:g}"
    if record.get("decorrelation_sample", 1.0) != 1.0:
      rule += f" on {record['decorrelation_sample']:g} of the batch"
  if record.get("stop_on_discrepancy"):
    rule += ", stopping rule"
  if record.get("loss", "auto") != "auto":
    rule += f", {record['loss']}"
  if any(record.get("clipped_displacements") or ()):
    rule += f", guard fired {record['clipped_displacements'][-1]:.0f} times"
  return rule


def _optimizer_label(record: dict) -> str:
  if record["rule"] in rules.OWN_STEP:
    return f"sgd ({rules.OWN_STEP[record['rule']]:g}), own step"
  return f"{record['optimizer']} ({record['lr']:g})"


def _cosines(record: dict) -> str:
  """Per-layer cosines to backprop before training and at the end: ``a b -> c d``."""
  probes = record.get("probes") or []
  if not probes:
    return ""
  layers = lambda p: " ".join(f"{v:.2f}" for k, v in p.items() if k != "epoch")  # noqa: E731
  return f"{layers(probes[0])} -> {layers(probes[-1])}"


def _step_memory(record: dict) -> str:
  memory = record.get("step_memory_mib")
  return "-" if memory is None else f"{memory:.1f}"


MAX_SHOWN_EPOCHS = 30


def _accuracies(record: dict) -> str:
  """Test accuracy per epoch; of a long run every k-th epoch's, and with several seeds each
  seed's peak (at epoch) and its lowest accuracy after the peak, so that a collapse shows."""
  values = record["test_accuracy"]
  every = -(-len(values) // MAX_SHOWN_EPOCHS)
  text = " ".join(f"{a:.3f}" for a in values[every - 1 :: every])
  if every == 1:
    return text
  text = f"(every {every} epochs) {text}"
  seeds = record.get("test_accuracy_seeds") or []
  if len(seeds) > 1:
    peaks = [(int(np.argmax(c)), c) for c in seeds]
    text += " [seeds: " + "; ".join(f"{c[i]:.2f}@{i + 1}, then >= {min(c[i:]):.2f}" for i, c in peaks) + "]"
  return text


def _epochs(record: dict) -> str:
  fresh = record.get("fresh_steps")
  return f"{record['epochs']} x {fresh} fresh batches" if fresh else str(record["epochs"])


def markdown(results: dict) -> str:
  """The suite as a markdown table, one row per run."""
  env = results["environment"]
  devices = (
    f"{env.get('device_count', 1)} devices, batch sharded" if results.get("data_parallel") else "one device"
  )
  lines = [
    f"# altgrad bench: {results['suite']}",
    "",
    f"jax {env['jax']}, optax {env['optax']}, flax {env['flax']}; {env['device']} ({env['processor']}), {devices}.",
    "Step time is the median over epochs of the mean step time (compilation excluded); the ratio divides it by "
    "backprop's on the same data, model and batch size in the same run. With several seeds (n > 1, trained "
    "together: vmapped, or in turn in one program) accuracies are means, with the standard deviation of the "
    "final one. Cosines are "
    "per layer, input to output, between the rule's update and the backprop gradient on "
    f"{PROBE_SIZE} training examples, before training -> after the last epoch (mean over seeds). Where a "
    "suite has no backprop run at a rule's batch size, one with Adam (0.001) is added as the timing "
    "reference: its accuracy is not a tuned baseline. Step MiB is the device memory the compiled epoch needs "
    "beyond its inputs (data set, params) and outputs: a step's working memory (XLA's memory analysis; runs "
    "recorded before it was measured show -).",
    "",
    "| data | model | batch | rule | optimizer (lr) | epochs | n | test acc (per epoch) | final test loss "
    "| cosine to backprop | ms/step | x backprop | step MiB |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in results["runs"].values():
    accs = _accuracies(r)
    seeds = r.get("seeds", 1)
    n = f"{seeds} in turn" if seeds > 1 and not r.get("vectorize", True) else str(seeds)
    if seeds > 1:
      accs += f" (± {r['test_accuracy_std'][-1]:.3f})"
    if r.get("restored_epoch") is not None:
      accs += f" (stopped; kept epoch {r['restored_epoch']})"
    lines.append(
      f"| {_data_label(r)} | {r['model']} {'-'.join(map(str, r['hidden'])) or '(no hidden)'} {r['activation']}"
      f"{', ' + r['kernel_init'] if r.get('kernel_init') else ''} "
      f"| {r['batch_size']} | {_rule_label(r)} | {_optimizer_label(r)} | {_epochs(r)} | {n} | {accs} "
      f"| {r['test_loss'][-1]:.4f} | {_cosines(r)} | {1e3 * r['median_step_time']:.3f} | {_ratio(r)} "
      f"| {_step_memory(r)} |"
    )
  return "\n".join(lines) + "\n"


def _ratio(record: dict) -> str:
  """The step-time ratio, marked where its reference was timed in another process."""
  if record.get("step_time_ratio") is None:
    return "n/a (reference timed on another machine)"
  mark = " (reference timed in another process)" if record.get("step_time_reference", "this process") != "this process" else ""
  return f"{record['step_time_ratio']:.2f}{mark}"


def plot(results: dict, path: str | Path) -> None:
  """Test accuracy against epoch and against training time, one line per run (mean over seeds,
  shaded ± one standard deviation), one row per data set and model; runs of a single epoch are
  points."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups: dict[tuple, list[dict]] = {}
  for r in results["runs"].values():
    key = (_data_label(r), r["model"], tuple(r["hidden"]), r["activation"])
    groups.setdefault(key, []).append(r)
  groups = {k: g for k, g in groups.items() if any(len(r["epoch"]) > 1 for r in g)}
  if not groups:
    return
  fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.4 * len(groups)), squeeze=False)
  for (ax_epoch, ax_time), ((data, model, hidden, activation), group) in zip(
    axes, groups.items(), strict=True
  ):
    for r in group:
      label = f"{_rule_label(r)}, {_optimizer_label(r)}, b{r['batch_size']}"
      mean, std = np.array(r["test_accuracy"]), np.array(r.get("test_accuracy_std", [0.0] * len(r["epoch"])))
      for ax, x in ((ax_epoch, r["epoch"]), (ax_time, r["wall_time"])):
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
        if np.any(std > 0):
          ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    title = f"{data}: {model} {'-'.join(map(str, hidden)) or '(no hidden)'} {activation}"
    ax_epoch.set(xlabel="epoch", ylabel="test accuracy", title=title)
    ax_time.set(xlabel="training time (s, log)", xscale="log", title=title)
    for ax in (ax_epoch, ax_time):
      ax.grid(alpha=0.3)
    ax_time.legend(fontsize=6, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


#: The README's results section lies between these two lines (written by tools/readme_results.py).
README_MARKERS = (
  "<!-- results: begin (tools/readme_results.py writes this block) -->",
  "<!-- results: end -->",
)


def readme_results(out_dir: str | Path) -> str:
  """The README's results block: the smoke suite's table and plot, then every other suite's plot
  and a link to its table, and a link to the perf table, from the files ``altgrad bench`` wrote
  to ``out_dir``."""
  out_dir = Path(out_dir)
  smoke = json.loads((out_dir / "smoke.json").read_text())
  table = markdown(smoke).split("\n", 2)[2]  # without the title
  lines = [README_MARKERS[0], "", table.rstrip(), "", f"![smoke suite]({out_dir.name}/smoke.png)", ""]
  for suite in SUITES:
    if suite != "smoke" and (out_dir / f"{suite}.json").exists():
      lines += [
        f"`{suite}`: [table]({out_dir.name}/{suite}.md)",
        "",
        f"![{suite} suite]({out_dir.name}/{suite}.png)",
        "",
      ]
  if (out_dir / "perf.json").exists():
    lines += [f"`perf` (step costs against backprop's): [table]({out_dir.name}/perf.md)", ""]
  return "\n".join([*lines, README_MARKERS[1]])
