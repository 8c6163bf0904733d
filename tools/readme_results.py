"""Rewrites each suite's results/SUITE.md (and results/gpu/SUITE.md) from its JSON, and the
README's results block from results/ (run after `altgrad bench`, or after changing how tables are written)."""

import json
from pathlib import Path

from altgrad._bench import README_MARKERS, SUITES, _perf, markdown, readme_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"

for folder in (RESULTS, RESULTS / "gpu"):
  for suite in SUITES:
    path = folder / f"{suite}.json"
    if path.exists():
      (folder / f"{suite}.md").write_text(markdown(json.loads(path.read_text())))
      print(f"{path.with_suffix('.md').relative_to(ROOT)}: rewritten from its JSON")
  if (folder / "perf.json").exists():
    (folder / "perf.md").write_text(_perf.markdown(json.loads((folder / "perf.json").read_text())))
    print(f"{(folder / 'perf.md').relative_to(ROOT)}: rewritten from its JSON")
readme = (ROOT / "README.md").read_text()
begin, end = README_MARKERS
head, rest = readme.split(begin, 1)
_, tail = rest.split(end, 1)
(ROOT / "README.md").write_text(head + readme_results(RESULTS) + tail)
print("README.md: results block rewritten from results/")
