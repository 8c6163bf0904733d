"""A suite's results as markdown, a plot and the README's results block."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from altgrad import rules
from altgrad._bench import _perf, _stats
from altgrad._bench._stats import ALPHA
from altgrad._bench._suites import PROBE_SIZE, REFERENCE_FIELDS, SUITES, Run


def _key(record: dict) -> str:
  """The record's :data:`REFERENCE_FIELDS`; a field newer than the record reads as its default,
  a tuned one as its grid (tuned runs compare at the settings each chose from the same grid)."""
  defaults = {field.name: field.default for field in dataclasses.fields(Run)}
  grid = _tuned_grid(record)
  values = [grid[field] if field in grid else record.get(field, defaults.get(field)) for field in REFERENCE_FIELDS]
  return json.dumps(values)  # tuples and lists alike


def _tuned_grid(record: dict) -> dict:
  """The grid ``record`` was tuned over (empty if untuned)."""
  return (record.get("tuning") or {}).get("grid", {})


def reference_of(record: dict, records: dict) -> dict | None:
  """The backprop run ``record`` is compared with: the same :data:`REFERENCE_FIELDS`, preferring
  the same optimizer, then one timed in the same process; ``None`` where the suite has none."""
  candidates = [r for r in records.values() if r["rule"] == "backprop" and _key(r) == _key(record)]
  if not candidates:
    return None
  rank = lambda r: (r["optimizer"] != record["optimizer"], r.get("session") != record.get("session"))  # noqa: E731
  return min(candidates, key=rank)


def same_machine_as(record: dict, reference: dict) -> bool:
  """Whether two runs were timed on the same kind of machine (their times can be divided)."""
  machine = ("platform", "processor", "device")
  return all(record.get("environment", {}).get(k) == reference.get("environment", {}).get(k) for k in machine)


def time_to(record: dict, target: float) -> tuple[int, float] | None:
  """``(epoch, seconds of training)`` when the run's mean test accuracy first reaches
  ``target``; ``None`` if it never does."""
  for epoch, accuracy, seconds in zip(record["epoch"], record["test_accuracy"], record["wall_time"], strict=True):
    if accuracy >= target:
      return epoch, seconds
  return None


def time_to_reference(record: dict, reference: dict | None) -> str:
  """When the run first reaches its backprop reference's final accuracy, and how its training
  time compares with the reference's own time to that accuracy."""
  if reference is None:
    return "-"
  target = reference["test_accuracy"][-1]
  reached = time_to(record, target)
  if reached is None:
    return f"not reached (best {max(record['test_accuracy']):.3f} < {target:.3f})"
  epoch, seconds = reached
  _, own = time_to(reference, target)
  ratio = f", {seconds / own:.2f}x" if same_machine_as(record, reference) and own > 0 else ""
  return f"epoch {epoch}, {seconds:.3g} s{ratio}"


def final_accuracies(record: dict) -> np.ndarray:
  """Each seed's final test accuracy."""
  seeds = record.get("test_accuracy_seeds") or [record["test_accuracy"]]
  return np.array([curve[-1] for curve in seeds])


def confidence_interval(values: np.ndarray) -> tuple[float, float] | None:
  """The 95% confidence interval of the mean of ``values`` (Student's t); ``None`` for one value."""
  if len(values) < 2:
    return None
  half = stats.t.ppf(1 - ALPHA / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
  return float(np.mean(values) - half), float(np.mean(values) + half)


def _final(record: dict) -> str:
  values = final_accuracies(record)
  interval = confidence_interval(values)
  text = f"{np.mean(values):.3f}"
  return text if interval is None else f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]"


def comparisons(records: dict) -> dict[str, tuple[_stats.Paired, float | None]]:
  """Each run's paired comparison with its backprop reference (same seeds), by name, with its
  p-value after Holm's correction over all the runs compared with that reference."""
  groups: dict[str, dict[str, _stats.Paired]] = {}
  for name, record in records.items():
    reference = reference_of(record, records)
    if reference is None or reference is record or reference.get("seed") != record.get("seed"):
      continue
    found = _stats.paired(final_accuracies(record), final_accuracies(reference))
    groups.setdefault(reference["name"], {})[name] = found
  compared = {}
  for group in groups.values():
    corrected = _stats.holm([found.p for found in group.values()])
    compared.update({name: (found, p) for (name, found), p in zip(group.items(), corrected, strict=True)})
  return compared


def versus_reference(record: dict, reference: dict | None, compared: tuple[_stats.Paired, float | None] | None) -> str:
  """The final accuracy against the backprop reference's, seed by seed: higher, lower or not
  significantly different at :data:`ALPHA` after Holm's correction; the mean paired difference
  with its 95% interval, the test, the corrected p-value and Cohen's d."""
  if reference is None or reference is record:
    return "-" if reference is None else "(reference)"
  if compared is None:
    return "n/a (other seeds)"
  found, p = compared
  if found.n < 2:
    return "n/a (one seed)"
  if p is None:
    return f"{found.difference:+.3f} on every seed (no spread)"
  low, high = found.interval
  verdict = ("higher" if found.difference > 0 else "lower") if p < ALPHA else "not significant"
  return f"{verdict}: {found.difference:+.3f} [{low:+.3f}, {high:+.3f}], {found.test} p = {p:.2g} (Holm), d = {found.effect:+.1f}"


def _data_label(record: dict) -> str:
  options = ", ".join(
    f"{k}={v}" for k, v in record["dataset_options"] if k in ("length", "as_sequence", "flatten")
  )
  return f"{record['dataset']} ({options})" if options else record["dataset"]


def _rule_label(record: dict) -> str:
  options = ", ".join(f"{k}={v}" for k, v in record["rule_options"])
  rule = f"{record['rule']} ({options})" if options else record["rule"]
  if record.get("decorrelation_lr") is not None:
    tuned = ", tuned" if "decorrelation_lr" in _tuned_grid(record) else ""
    rule = f"d{rule}, decorrelation lr {record['decorrelation_lr']:g}{tuned}"
    if record.get("decorrelation_sample", 1.0) != 1.0:
      rule += f" on {record['decorrelation_sample']:g} of the batch"
    if record.get("decorrelation_kappa", 0.0):
      rule += f", kappa {record['decorrelation_kappa']:g}"
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
  return f"{record['optimizer']} ({record['lr']:g}{', tuned' if record.get('tuning') else ''})"


def tuning_lines(records: dict) -> list[str]:
  """Each tuned run's grid: every point's mean validation score, the chosen one in bold."""
  tuned = [r for r in records.values() if r.get("tuning")]
  if not tuned:
    return []
  first = tuned[0]["tuning"]
  lines = [
    "",
    f"Tuned runs (optimizer '(lr, tuned)'): each grid point trained from seeds {list(first['seeds'])} on the "
    f"training data less a held-out {first['validation']:g} of it and scored by its mean final "
    f"{first['metric']} there (the test split is never read); the best point (bold) is the run's setting, "
    "trained from the run's own seeds and reported on the test split.",
    "",
  ]
  for record in tuned:
    tuning = record["tuning"]
    cells = []
    for point, mean in zip(tuning["points"], tuning["means"], strict=True):
      label = ", ".join(f"{'lr' if k == 'learning_rate' else k} {v:g}" for k, v in point.items())
      cell = f"{label}: {mean:.3f}"
      cells.append(f"**{cell}**" if point == tuning["chosen"] else cell)
    lines.append(f"- {_rule_label(record)} ({record['dataset']}, {record['model']}): {'; '.join(cells)}")
  return lines


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
    "together: vmapped, or in turn in one program) accuracies are means over seeds; the final one has its 95% "
    "confidence interval (Student's t over seeds). 'vs backprop' pairs the run's final accuracies seed by seed "
    "with its backprop reference's (same data, model, batch size and seeds: the same initial params, shuffles "
    "and keys): the mean difference with its 95% interval, the test (the paired t-test; from n = 6, where "
    "Wilcoxon's signed-rank test can reach 5%, Wilcoxon's where Shapiro-Wilk rejects normal differences: "
    "below 6 seeds a verdict rests on the t-test's assumption of normal differences), its p-value after Holm's correction over "
    "all the runs compared with the same reference, Cohen's d for paired samples, and the verdict at the 5% "
    "level; n is the column n. 'To backprop's "
    "final' is the first epoch at which the mean accuracy reaches the reference's final accuracy, the training "
    "time until then (all seeds together, compilation excluded) and its ratio to the reference's own time to "
    "that accuracy (time to accuracy). Cosines are "
    "per layer, input to output, between the rule's update and the backprop gradient on "
    f"{PROBE_SIZE} training examples, before training -> after the last epoch (mean over seeds). Where a "
    "suite has no backprop run at a rule's batch size, one with Adam (0.001) is added as the timing "
    "reference: its accuracy is not a tuned baseline. Step MiB is the device memory the compiled epoch needs "
    "beyond its inputs (data set, params) and outputs: a step's working memory (XLA's memory analysis; runs "
    "recorded before it was measured show -).",
    "",
    "| data | model | batch | rule | optimizer (lr) | epochs | n | test acc (per epoch) | final acc (95% CI) "
    "| vs backprop | to backprop's final | final test loss | cosine to backprop | ms/step | x backprop | step MiB |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  records = results["runs"]
  compared = comparisons(records)
  for name, r in records.items():
    accs = _accuracies(r)
    seeds = r.get("seeds", 1)
    n = f"{seeds} in turn" if seeds > 1 and not r.get("vectorize", True) else str(seeds)
    reference = reference_of(r, records)
    if r.get("restored_epoch") is not None:
      accs += f" (stopped; kept epoch {r['restored_epoch']})"
    lines.append(
      f"| {_data_label(r)} | {r['model']} {'-'.join(map(str, r['hidden'])) or '(no hidden)'} {r['activation']}"
      f"{', ' + r['kernel_init'] if r.get('kernel_init') else ''} "
      f"| {r['batch_size']} | {_rule_label(r)} | {_optimizer_label(r)} | {_epochs(r)} | {n} | {accs} "
      f"| {_final(r)} | {versus_reference(r, reference, compared.get(name))} | {time_to_reference(r, reference)} "
      f"| {r['test_loss'][-1]:.4f} | {_cosines(r)} | {1e3 * r['median_step_time']:.3f} | {_ratio(r)} "
      f"| {_step_memory(r)} |"
    )
  return "\n".join(lines + tuning_lines(records)) + "\n"


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


def tables(results: str | Path) -> dict[Path, str]:
  """Every table under ``results`` and ``results/gpu`` as its JSON makes it: ``SUITE.md`` of
  each suite's ``SUITE.json``, and ``perf.md`` of ``perf.json``."""

  found = {}
  for folder in (Path(results), Path(results) / "gpu"):
    for suite, render in [*((suite, markdown) for suite in SUITES), ("perf", _perf.markdown)]:
      if (folder / f"{suite}.json").exists():
        found[folder / f"{suite}.md"] = render(json.loads((folder / f"{suite}.json").read_text()))
  return found


#: The suites whose whole table the README shows; the others it links.
README_TABLES = ("smoke", "conv")


def readme_results(out_dir: str | Path) -> str:
  """The README's results block, from the files ``altgrad bench`` wrote to ``out_dir``: the
  tables of :data:`README_TABLES` and a link to every other suite's, each suite's plot, and a
  link to the perf table."""
  out_dir = Path(out_dir)
  lines = [README_MARKERS[0], ""]
  for suite in SUITES:
    path = out_dir / f"{suite}.json"
    if not path.exists():
      continue
    if suite in README_TABLES:
      table = markdown(json.loads(path.read_text())).split("\n", 2)[2]  # without the title
      lines += [f"`{suite}`:", "", table.strip(), ""]
    else:
      lines += [f"`{suite}`: [table]({out_dir.name}/{suite}.md)", ""]
    lines += [f"![{suite} suite]({out_dir.name}/{suite}.png)", ""]
  if (out_dir / "perf.json").exists():
    lines += [f"`perf` (step costs against backprop's): [table]({out_dir.name}/perf.md)", ""]
  return "\n".join([*lines, README_MARKERS[1]])
