"""Paired comparisons over seeds: a rule against its backprop reference trained on the same
seeds (the same initial params, shuffles and keys), so the final accuracies pair seed by seed."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

#: Two-sided significance level of every test.
ALPHA = 0.05

#: The fewest pairs at which Wilcoxon's signed-rank test can reach :data:`ALPHA` (its smallest
#: two-sided p-value is ``2 / 2**n``: 1/16 at five pairs, 1/32 at six).
WILCOXON_MIN_N = 6


@dataclasses.dataclass(frozen=True)
class Paired:
  """The differences ``values - reference`` seed by seed: their ``n``, mean, 95% interval
  (Student's t), the paired t-test's and Wilcoxon's signed-rank test's two-sided p-values,
  whether Shapiro-Wilk keeps them normal (tested from :data:`WILCOXON_MIN_N` pairs: below, no
  test could reject and Wilcoxon's could not reach significance), and Cohen's d for paired samples (the mean
  difference over the differences' standard deviation). ``None`` where a figure is undefined
  (one seed; differences without spread)."""

  n: int
  difference: float
  interval: tuple[float, float] | None
  t_p: float | None
  wilcoxon_p: float | None
  normal: bool | None
  effect: float | None

  @property
  def test(self) -> str:
    """The test the verdict uses: the paired t-test, or Wilcoxon's where the differences are far
    from normal (Shapiro-Wilk rejects at :data:`ALPHA`, from :data:`WILCOXON_MIN_N` pairs)."""
    return "Wilcoxon" if self.normal is False else "paired t"

  @property
  def p(self) -> float | None:
    return self.wilcoxon_p if self.normal is False else self.t_p


def paired(values: Sequence[float], reference: Sequence[float]) -> Paired:
  """The paired comparison of ``values`` with ``reference`` (the same seeds, in order)."""
  values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
  if values.shape != reference.shape or values.ndim != 1:
    raise ValueError(f"paired samples need one value per seed on both sides; got {values.shape} and {reference.shape}")
  differences = values - reference
  n, mean = len(differences), float(np.mean(differences))
  spread = float(np.std(differences, ddof=1)) if n > 1 else 0.0
  if n < 2 or spread < 1e-12:
    return Paired(n, mean, None, None, None, None, None)
  half = stats.t.ppf(1 - ALPHA / 2, n - 1) * spread / math.sqrt(n)
  with warnings.catch_warnings():  # scipy warns of small samples it still answers exactly
    warnings.simplefilter("ignore")
    t_p = float(stats.ttest_rel(values, reference).pvalue)
    wilcoxon_p = float(stats.wilcoxon(differences).pvalue) if np.any(differences != 0) else 1.0
    normal = bool(stats.shapiro(differences).pvalue >= ALPHA) if n >= WILCOXON_MIN_N else None
  return Paired(n, mean, (mean - half, mean + half), t_p, wilcoxon_p, normal, mean / spread)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
  """Holm's step-down correction of ``pvalues`` for testing them together (``None`` passes
  through and does not count): the ``i``-th smallest of ``m`` times ``m - i + 1``, made
  non-decreasing, at most 1."""
  order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
  adjusted: list[float | None] = [None] * len(pvalues)
  running = 0.0
  for rank, (p, i) in enumerate(order):
    running = max(running, min(1.0, (len(order) - rank) * p))
    adjusted[i] = running
  return adjusted
