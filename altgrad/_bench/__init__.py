"""`altgrad bench`: named suites of training runs, compared with backprop in the same process.

A suite is a list of :class:`Run` (``_suites.py``, the settings only). Every run's step time is
divided by that of the backprop run on the same data, model and batch size in the same suite
(``_run.py``). A run of several seeds trains them together, vmapped in one compiled program, and
reports their mean and spread. Results go to ``<out>/<suite>.json`` (resumable: finished runs
are kept and skipped), ``<out>/<suite>.md`` and ``<out>/<suite>.png`` (``_report.py``). The
``perf`` suite (``_perf.py``) times single steps instead. ``_experiment.py`` builds the models,
rules and optimizers that ``altgrad compare`` and the suites name; ``_zoo.py`` holds the
ordinary NNX models among them.
"""

from altgrad._bench._controls import BENCH_RULES, plain_gradient, scaled_backprop
from altgrad._bench._environment import environment
from altgrad._bench._report import README_MARKERS, markdown, plot, readme_results, tables
from altgrad._bench._run import execute, run_suite, summarize
from altgrad._bench._suites import SUITES, Run

__all__ = [
  "BENCH_RULES",
  "README_MARKERS",
  "SUITES",
  "Run",
  "environment",
  "execute",
  "markdown",
  "plain_gradient",
  "plot",
  "readme_results",
  "run_suite",
  "scaled_backprop",
  "summarize",
  "tables",
]
