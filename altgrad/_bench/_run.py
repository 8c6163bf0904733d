"""Running a suite: each run trained (resumably), summarized, and its step time divided by
backprop's timed in the same session."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path

import numpy as np
import optax

from altgrad import _distributed, _interrupt, diagnostics, losses, rules, train
from altgrad import data as data_lib
from altgrad._bench._controls import BENCH_RULES
from altgrad._bench._environment import environment
from altgrad._bench._experiment import build_model, loss_for, make_rule, optimizer_for
from altgrad._bench._report import markdown, plot, reference_of, same_machine_as
from altgrad._bench._suites import PROBE_SIZE, SUITES, TUNE_SEEDS, TUNED_FIELDS, VALIDATION, Run
from altgrad.data._dataset import held_out_count


def execute(run: Run, *, data_parallel: bool = False) -> dict:
  """Trains ``run`` and returns its record: the run's settings, the per-epoch mean (and spread
  over seeds) of accuracy and loss, step times, per-layer cosines to backprop and peak memory;
  for a tuned run, first its grid on a validation split (``tuning``), then the chosen setting."""
  dataset = data_lib.load(run.dataset, **dict(run.dataset_options))
  loss_fn = loss_for(dataset) if run.loss == "auto" else getattr(losses, run.loss)
  name, tuning = run.name, None
  if run.tune:
    tuning = tune_run(run, dataset, loss_fn)
    chosen = dict(tuning.chosen)
    fields = {"lr": chosen.pop("learning_rate", run.lr)} | {k: chosen.pop(k) for k in TUNED_FIELDS if k in chosen}
    run = dataclasses.replace(run, **fields, rule_options=tuple((dict(run.rule_options) | chosen).items()))
  built = {}
  build = builder(run, dataset, loss_fn, len(dataset.x_train), built)
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
  record = dataclasses.asdict(run) | summarize(histories) | {"name": name}
  return record if tuning is None else record | {"tuning": tuning.as_dict()}


def builder(run: Run, dataset, loss_fn, data_size: int, built: dict | None = None, tuned=()):
  """``build(seed, **fields) -> (model, tx)`` of ``run`` (``data_size`` training examples, for
  ER), with ``fields`` of :data:`TUNED_FIELDS` replaced; the ``tuned`` hyperparameters
  (optimizer's ``learning_rate``, rule options) in the state."""

  def build(seed, **fields):  # fields: the tuned values of TUNED_FIELDS
    setting = dataclasses.replace(run, **fields)
    model = build_model(
      dataset,
      setting.model,
      setting.hidden,
      setting.activation,
      seed,
      setting.decorrelation_lr,
      setting.decorrelation_sample,
      setting.kernel_init,
      setting.decorrelation_kappa,
    )
    options = dict(run.rule_options)
    in_rule = tuple(k for k in tuned if k != "learning_rate")
    rule = make_rule(run.rule, model, loss_fn, seed, data_size, registry=BENCH_RULES, tuned=in_rule, **options)
    if built is not None:
      built[seed] = (model, rule)
    return model, optax.chain(rule, optimizer_for(run.rule, run.optimizer, run.lr, tuned="learning_rate" in tuned))

  return build


def tune_run(run: Run, dataset, loss_fn) -> train.Tuning:
  """``run``'s grid tried on a validation split of ``dataset``'s training data (``lr`` is the
  optimizer's ``learning_rate``); every point from :data:`TUNE_SEEDS`, in one program (one per
  value of :data:`TUNED_FIELDS`)."""
  grid = {"learning_rate" if k == "lr" else k: v for k, v in run.tune}
  if run.rule in rules.OWN_STEP and "learning_rate" in grid:
    raise ValueError(f"{run.name}: {run.rule} steps at its own rate; tune its options, not lr")
  if "decorrelation_lr" in grid and run.decorrelation_lr is None:
    raise ValueError(f"{run.name}: tuning decorrelation_lr needs a decorrelated run (give it a decorrelation_lr)")
  static = tuple(k for k in grid if k in TUNED_FIELDS)
  count = len(dataset.x_train)
  size = count - held_out_count(count, VALIDATION, dataset.name)  # the examples it trains on
  build = builder(run, dataset, loss_fn, size, tuned=tuple(k for k in grid if k not in static))
  return train.tune(
    build,
    grid,
    dataset,
    loss_fn=loss_fn,
    epochs=run.epochs,
    batch_size=min(run.batch_size, size),  # a full-batch run tunes on the whole of what is left
    seeds=TUNE_SEEDS,
    validation=VALIDATION,
    static=static,
    vectorize=run.vectorize,
    fresh_steps=run.fresh_steps,
    progress=False,
  )


def summarize(histories: list[train.History]) -> dict:
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
  suite: str,
  out_dir: str | Path,
  *,
  progress: bool | None = None,
  data_parallel: bool = False,
  decorrelation_kappa: float | None = None,
) -> dict:
  """Runs (or resumes) ``suite``, writes its JSON, markdown and plot, and returns the results;
  ``decorrelation_kappa`` replaces the kappa of the suite's decorrelated runs."""
  if suite not in SUITES:
    raise ValueError(f"unknown suite {suite!r}; expected one of {sorted(SUITES)}")
  out_dir = Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f"--out {out_dir} is a file: give a directory (it is created)")
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{suite}.json"
  previous = read_previous(path)
  if previous and previous.get("data_parallel", False) != data_parallel:
    raise ValueError(
      f"{path} was run with data_parallel={previous.get('data_parallel', False)}; resume it the same way "
      "or write elsewhere (--out)"
    )
  runs = suite_runs(suite, decorrelation_kappa)
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
  add_ratios(results["runs"])
  if primary:
    path.write_text(json.dumps(results, indent=1))
    (out_dir / f"{suite}.md").write_text(markdown(results))
    try:
      plot(results, out_dir / f"{suite}.png")
    except Exception as error:  # matplotlib's errors are of many kinds; the JSON and markdown are written
      raise ValueError(f"{out_dir / f'{suite}.png'}: the plot failed ({type(error).__name__}: {error}); "
                       f"{path} and its markdown are written") from None
  return results


def suite_runs(suite: str, decorrelation_kappa: float | None = None) -> list[Run]:
  """``suite``'s runs (its decorrelated ones at ``decorrelation_kappa``, if given), and a backprop
  reference (Adam 1e-3) for every setting that has none."""
  runs = SUITES[suite]()
  if decorrelation_kappa is not None:  # the layers check it
    runs = [
      dataclasses.replace(r, decorrelation_kappa=decorrelation_kappa) if r.decorrelation_lr is not None else r
      for r in runs
    ]
  referenced = {r.reference_key for r in runs if r.rule == "backprop"}
  missing_references = [k for k in dict.fromkeys(r.reference_key for r in runs) if k not in referenced]  # in suite order
  references = [next(r for r in runs if r.reference_key == k) for k in missing_references]
  return runs + [
    dataclasses.replace(r, rule="backprop", rule_options=(), optimizer="adam", lr=1e-3, stop_on_discrepancy=False)
    for r in references
  ]


#: This process's bench session: step-time ratios divide by a reference of the same session.
SESSION = uuid.uuid4().hex


def read_previous(path: Path) -> dict:
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


def add_ratios(records: dict) -> None:
  """Divides each run's step time by its backprop reference's (:func:`reference_of`) where both
  were timed in one process; a ratio to a reference timed in another process on the same machine
  is marked as such, and none is made to one timed elsewhere."""
  for run in records.values():
    reference = reference_of(run, records)
    if reference is None:
      continue
    same_machine = same_machine_as(run, reference)
    run["step_time_ratio"] = run["median_step_time"] / reference["median_step_time"] if same_machine else None
    run["step_time_reference"] = (
      "this process" if run.get("session") == reference.get("session")
      else "another process, this machine" if same_machine else "another machine: no ratio"
    )