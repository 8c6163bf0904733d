"""The `altgrad` commands: `altgrad compare` trains one model with several rules; `altgrad bench`
runs a benchmark suite. The entry point, with Ctrl-C and errors, is `altgrad._cli`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import optax

from altgrad import _bench, _distributed, _interrupt, nn, rules, train
from altgrad import data as data_lib
from altgrad._bench import _perf
from altgrad._bench._experiment import (
  KERNEL_INITS,
  MODELS,
  OPTIMIZERS,
  build_model,
  loss_for,
  make_rule,
  optimizer_for,
)
from altgrad._bench._run import tune_run
from altgrad._bench._suites import Run

DATA_PARALLEL_HELP = (
  "shard every batch over all devices (jax.devices()), params replicated; the batch size must divide "
  "by the device count"
)


def _add_process_options(p: argparse.ArgumentParser) -> None:
  """Flags of a run that spans several processes (JAX's multi-controller runtime); they imply
  --data-parallel. Every process runs the same command; process 0 prints and writes files."""
  g = p.add_argument_group(
    "several processes",
    "run the same command in every process (one per host, or per GPU); they join into one "
    "data-parallel run over all their devices, and only process 0 prints and writes files",
  )
  g.add_argument(
    "--coordinator",
    default="",
    help="HOST:PORT where process 0 serves the coordinator (all processes pass the same), or "
    f"'{_distributed.AUTO}' to let JAX find the cluster (TPU slices, SLURM, Open MPI)",
  )
  g.add_argument("--num-processes", type=_positive(int), help="how many processes join (with --coordinator)")
  g.add_argument("--process-id", type=int, help="this process's index, 0 to num-processes - 1")
  g.add_argument(
    "--init-timeout",
    type=_positive(float),
    default=120.0,
    help="seconds to wait for the other processes and the coordinator (default: 120)",
  )
  g.add_argument(
    "--processes",
    type=_positive(int),
    default=1,
    help="start this many local processes joined through 127.0.0.1, to try a multi-process run on "
    "one machine (default: 1)",
  )


def _sizes(text: str) -> tuple[int, ...]:
  try:
    sizes = tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated widths such as 128,128, got {text!r}"
    ) from None
  if any(s < 1 for s in sizes):
    raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
  return sizes


def _rule_names(text: str) -> tuple[str, ...]:
  names = tuple(s.strip() for s in text.split(",") if s.strip())
  unknown = [n for n in names if n not in rules.RULES]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"unknown rule(s) {unknown}; available: {', '.join(rules.RULES)}")
  return names


def _positive(kind):
  def parse(text: str):
    value = kind(text)
    if not (value > 0 and math.isfinite(value)):
      raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text}")
    return value

  return parse


def _non_negative(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
  return value


def _check_output(flag: str, path: str) -> None:
  """Refuses, before any training, an output file that could not be written."""
  if not path:
    return
  target = Path(path).absolute()
  if target.is_dir():
    raise ValueError(f"{flag} {path} is a directory: give a file name")
  if not target.parent.is_dir():
    raise ValueError(f"{flag} {path}: the directory {target.parent} does not exist")
  if not os.access(target.parent, os.W_OK):
    raise ValueError(f"{flag} {path}: the directory {target.parent} is not writable")


def _fraction(text: str) -> float:
  value = float(text)
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
  return value


def _learning_rates(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be comma-separated learning rates, got {text!r}") from None
  if not all(v > 0 for v in values):
    raise argparse.ArgumentTypeError(f"learning rates must be positive, got {text!r}")
  return values


def _unit_interval(text: str) -> float:
  value = float(text)
  if not 0 <= value <= 1:
    raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
  return value


def compare(args: argparse.Namespace) -> dict:
  """Trains every rule of ``args`` (backprop first), prints the table and writes the JSON and
  the plot; after a Ctrl-C, reports the rules that finished, then stops (KeyboardInterrupt)."""
  for flag, path in (("--json", args.json), ("--plot", args.plot)):
    _check_output(flag, path)
  dataset = data_lib.load(args.dataset)
  results, skipped = {}, {}
  try:
    _train_each(args, dataset, results, skipped)
  except KeyboardInterrupt:
    _report(args, dataset, results, skipped)
    _interrupt.keep(f"{len(results)} rule(s) that finished, reported above" + (f" and in {args.json}" if args.json and results else ""))
    if args.checkpoint_dir:
      _interrupt.keep(f"the last epoch's checkpoint in {args.checkpoint_dir}")
    raise
  _report(args, dataset, results, skipped)
  return results


def _train_each(args: argparse.Namespace, dataset, results: dict, skipped: dict) -> None:
  """Trains every rule of ``args`` on ``dataset``, adding each history to ``results`` as it ends."""
  loss_fn = loss_for(dataset)
  names = ("backprop", *(n for n in args.rules if n != "backprop"))
  for name in names:
    _interrupt.check()
    model = build_model(
      dataset,
      args.model,
      args.hidden,
      args.activation,
      args.seed,
      args.decorrelation_lr,
      args.decorrelation_sample,
      args.kernel_init,
      args.decorrelation_kappa,
    )
    try:
      rule = make_rule(name, model, loss_fn, args.seed, len(dataset.x_train))
    except (TypeError, ValueError) as reason:  # the rule cannot handle this model
      if name == "backprop":
        raise
      skipped[name] = str(reason)
      continue
    lr, tuning = args.lr, None
    if args.tune is not None and name not in rules.OWN_STEP:
      tuning = _tuned(args, dataset, name)
      lr = tuning.chosen["learning_rate"]
    tx = optax.chain(rule, optimizer_for(name, args.optimizer, lr))
    history = train.fit(
      model,
      tx,
      dataset,
      loss_fn=loss_fn,
      epochs=args.epochs,
      batch_size=args.batch_size,
      seed=args.seed,
      progress=False if args.no_progress else None,
      data_parallel=args.data_parallel,
      checkpoint_dir=os.path.join(args.checkpoint_dir, name) if args.checkpoint_dir else None,
      resume_anyway=args.resume_anyway,
    )
    results[name] = history.as_dict() | {"lr": lr}
    if tuning is not None:
      results[name]["tuning"] = tuning.as_dict()
    results[name]["step_time_ratio"] = results[name]["median_step_time"] / results["backprop"]["median_step_time"]


def _report(args: argparse.Namespace, dataset, results: dict, skipped: dict) -> None:
  """Prints the table of the rules in ``results`` and writes the JSON and the plot, each even
  when the other fails (the failures are raised together after)."""
  if not results or not _distributed.is_primary():
    return
  _print_table(dataset.name, results, sys.stdout)
  for name, reason in skipped.items():
    print(f"skipped {name}: {reason}")
  if rules.OWN_STEP.keys() & results.keys():
    print(
      f"{', '.join(sorted(rules.OWN_STEP.keys() & results.keys()))}: applied with sgd at the rule's own step, not --optimizer"
    )
  failures = []
  if args.json:
    try:
      with open(args.json, "w") as f:
        json.dump({"dataset": dataset.name, "settings": _settings(args), "results": results}, f, indent=1)
      print(f"results written to {args.json}")
    except (OSError, TypeError, ValueError) as error:
      failures.append(f"--json {args.json}: {error}")
  if args.plot:
    try:
      _plot(dataset.name, results, args.plot)
      print(f"plot written to {args.plot}")
    except Exception as error:  # matplotlib's errors are of many kinds; the JSON is written
      failures.append(f"--plot {args.plot}: {type(error).__name__}: {error}")
  if failures:
    raise ValueError("; ".join(failures))


#: ``compare --tune`` without values: the learning rates tried, as multiples of ``--lr``.
TUNE_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)


def _tuned(args: argparse.Namespace, dataset, name: str) -> train.Tuning:
  """Rule ``name``'s learning rate chosen on a validation split of the training data (the
  bench's harness: every value from two seeds of their own, in one program)."""
  grid = tuple(args.tune) or tuple(args.lr * f for f in TUNE_FACTORS)
  run = Run(
    args.dataset, tuple(args.hidden), name, args.optimizer, args.lr, args.epochs, args.batch_size,
    model=args.model, activation=args.activation, seed=args.seed, decorrelation_lr=args.decorrelation_lr,
    decorrelation_sample=args.decorrelation_sample, decorrelation_kappa=args.decorrelation_kappa,
    kernel_init=args.kernel_init, tune=(("lr", grid),),
  )
  tuning = tune_run(run, dataset, loss_for(dataset))
  means = ", ".join(f"{p['learning_rate']:g}: {m:.3f}" for p, m in zip(tuning.points, tuning.means, strict=True))
  print(f"tuned {name}: lr {tuning.chosen['learning_rate']:g} ({tuning.metric}: {means})")
  return tuning


def _settings(args: argparse.Namespace) -> dict:
  return {k: v for k, v in vars(args).items() if k not in ("func",)}


def _print_table(title: str, results: dict, out) -> None:
  tuned = any("tuning" in r for r in results.values())
  header = f"{'rule':<16} {'test acc':>9} {'test loss':>10} {'ms/step':>9} {'x backprop':>11}"
  header += f" {'tuned lr':>9}" if tuned else ""
  print(f"\n{title}", file=out)
  print(header, file=out)
  print("-" * len(header), file=out)
  for name, r in results.items():
    lr = (f" {r['lr']:>9.3g}" if "tuning" in r else f" {'-':>9}") if tuned else ""
    print(
      f"{name:<16} {r['test_accuracy'][-1]:>9.4f} {r['test_loss'][-1]:>10.4f} "
      f"{1e3 * r['median_step_time']:>9.3f} {r['step_time_ratio']:>11.2f}{lr}",
      file=out,
    )


def _plot(title: str, results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in results.items():
    ax.plot(r["epoch"], r["test_accuracy"], marker="o", markersize=3, label=name)
  ax.set_xlabel("epoch")
  ax.set_ylabel("test accuracy")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="altgrad", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  _add_compare_parser(commands)
  _add_bench_parser(commands)
  return parser


def _add_compare_parser(commands) -> None:
  p = commands.add_parser(
    "compare",
    help="train one model with several rules and print a table",
    description="Train the same model (same initialization, same batches) with each rule followed "
    "by the same optimizer, then print final test accuracy, test loss, median time per step "
    "and the step-time ratio to backprop, and plot test accuracy against epoch.",
  )
  _add_model_options(p)
  _add_training_options(p)
  _add_process_options(p)
  p.set_defaults(func=compare)


def _add_model_options(p: argparse.ArgumentParser) -> None:
  """The data, the rules and the model of ``altgrad compare``."""
  p.add_argument(
    "--dataset",
    default="digits",
    choices=sorted(data_lib.LOADERS),
    help="data set (default: digits, embedded in scikit-learn)",
  )
  p.add_argument(
    "--rules",
    type=_rule_names,
    default=tuple(rules.RULES),
    help=f"comma-separated rules (default: all: {','.join(rules.RULES)}); backprop always runs as the reference",
  )
  p.add_argument(
    "--model",
    choices=MODELS,
    default="auto",
    help="model family; auto picks mlp for vectors, rnn for sequences, conv for images; gru is a "
    "GRU for sequences (target propagation inverts it gate by gate); cnn (images) is altgrad's conv net "
    "written in plain NNX; resnet "
    "(images) and transformer (token sequences, e.g. --dataset majority) are ordinary NNX models "
    "without altgrad layers",
  )
  p.add_argument(
    "--hidden",
    type=_sizes,
    default=(128, 128),
    help="hidden widths, comma-separated (the RNN uses the first; resnet and transformer: the "
    "first is the width, the count the number of blocks) (default: 128,128)",
  )
  p.add_argument(
    "--activation", default="tanh", choices=nn.ACTIVATIONS, help="hidden activation (default: tanh)"
  )
  p.add_argument(
    "--decorrelation-lr",
    type=float,
    default=None,
    help="give every Dense layer a decorrelating matrix trained at this rate (NP's D-variants; mlp and "
    "conv models, whose Conv layers have none; default: none)",
  )
  p.add_argument(
    "--decorrelation-sample",
    type=_fraction,
    default=1.0,
    help="the fraction of each batch the decorrelation update is estimated on (default: 1.0, the "
    "whole batch, as the node-perturbation authors do; 0.1 estimates it on a tenth)",
  )
  p.add_argument(
    "--decorrelation-kappa",
    type=_unit_interval,
    default=0.0,
    help="the weight of the decorrelation update's unit-variance term, artcogsys/decorbp's kappa "
    "(default: 0.0, the node-perturbation authors' rule; decorbp's ResNet setting is 0.01)",
  )
  p.add_argument(
    "--kernel-init",
    choices=sorted(KERNEL_INITS),
    help="initializer of the MLP's and conv net's kernels (default: lecun_normal; the "
    "node-perturbation authors use he_normal)",
  )


def _add_training_options(p: argparse.ArgumentParser) -> None:
  """The optimizer, the schedule and the outputs of ``altgrad compare``."""
  p.add_argument(
    "--optimizer",
    choices=sorted(OPTIMIZERS),
    default="adam",
    help="optimizer after each rule (default: adam)",
  )
  p.add_argument("--lr", type=_positive(float), default=3e-3, help="learning rate (default: 3e-3)")
  p.add_argument(
    "--tune",
    type=_learning_rates,
    nargs="?",
    const=(),
    default=None,
    help="choose each rule's learning rate first, on a held-out tenth of the training data (the test split "
    "is never read), from these comma-separated values (default: --lr times 0.1, 0.3, 1, 3 and 10); "
    "the table reports the chosen one",
  )
  p.add_argument("--epochs", type=_positive(int), default=20, help="epochs (default: 20)")
  p.add_argument("--batch-size", type=_positive(int), default=64, help="batch size (default: 64)")
  p.add_argument(
    "--seed", type=_non_negative, default=0, help="seed of the initialization and the shuffling (default: 0)"
  )
  p.add_argument(
    "--checkpoint-dir",
    default="",
    help="checkpoint every rule's run there after each epoch (a directory per rule) and resume from it",
  )
  p.add_argument(
    "--resume-anyway",
    action="store_true",
    help="resume a checkpoint whose run was described otherwise (a changed setting); see fit's resume_anyway",
  )
  p.add_argument(
    "--plot",
    default="altgrad-compare.png",
    help="PNG of test accuracy against epoch; '' for none (default: altgrad-compare.png)",
  )
  p.add_argument("--json", default="", help="also write all histories to this JSON file")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  p.add_argument("--data-parallel", action="store_true", help=DATA_PARALLEL_HELP)


def _add_bench_parser(commands) -> None:
  b = commands.add_parser(
    "bench",
    help="run a benchmark suite and write JSON and markdown",
    description="Run a named suite of training runs; every step time is divided by backprop's on the "
    "same data, model and batch size in the same process. Writes OUT/SUITE.json (resumable: finished runs "
    "are skipped when it is run again), OUT/SUITE.md and OUT/SUITE.png. The perf suite times single steps "
    "instead (step and compile time, FLOPs, peak memory against backprop's) and writes OUT/perf.json and .md.",
  )
  b.add_argument(
    "--suite", default="smoke", choices=sorted([*_bench.SUITES, "perf"]), help="suite to run (default: smoke)"
  )
  b.add_argument("--out", default="results", help="output directory (default: results)")
  b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  b.add_argument("--data-parallel", action="store_true", help=DATA_PARALLEL_HELP)
  b.add_argument(
    "--decorrelation-kappa",
    type=_unit_interval,
    default=None,
    help="run the suite's decorrelated runs with this unit-variance weight (artcogsys/decorbp's kappa; "
    "default: each run's own, as the suite lists it); they are recorded as runs of their own",
  )
  _add_process_options(b)
  b.set_defaults(func=bench)


def bench(args: argparse.Namespace) -> dict:
  if args.suite == "perf":
    if args.data_parallel or args.decorrelation_kappa is not None:
      raise SystemExit("altgrad bench: the perf suite times steps on one device, as it lists them; "
                       "drop --data-parallel and --decorrelation-kappa")
    results = _perf.run(args.out, progress=False if args.no_progress else None)
    if _distributed.is_primary():
      print(_perf.markdown(results))
      print(f"results written to {args.out}/perf.json and .md")
    return results
  results = _bench.run_suite(
    args.suite,
    args.out,
    progress=False if args.no_progress else None,
    data_parallel=args.data_parallel,
    decorrelation_kappa=args.decorrelation_kappa,
  )
  if _distributed.is_primary():
    print(_bench.markdown(results))
    print(f"results written to {args.out}/{args.suite}.json, .md and .png")
  return results


def _without_processes(argv: Sequence[str]) -> list[str]:
  """``argv`` less its ``--processes N`` (or ``--processes=N``)."""
  out, skip = [], False
  for token in argv:
    if skip:
      skip = False
    elif token == "--processes":
      skip = True
    elif not token.startswith("--processes="):
      out.append(token)
  return out


def main(argv: Sequence[str]) -> int:
  """Runs the command of ``argv``; errors propagate to ``altgrad._cli``, which reports them."""
  args = make_parser().parse_args(argv)
  if args.processes > 1:
    if args.coordinator:
      raise ValueError("--processes starts its own coordinator: do not pass --coordinator with it")
    return _distributed.launch_local(_without_processes(argv), args.processes, args.init_timeout)
  if args.coordinator:
    launcher = os.environ.get(_distributed.LAUNCHER)
    _interrupt.stop_at_once(int(launcher) if launcher else None)  # peers would wait for it in a collective
    _distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
    args.data_parallel = True
  args.func(args)
  return 0
