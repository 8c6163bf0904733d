"""A suite's results as markdown, a plot and the README's results block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from altgrad import rules
from altgrad._bench._suites import PROBE_SIZE, SUITES


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
