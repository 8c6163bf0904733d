"""Rewrites each suite's results/SUITE.md (and results/gpu/SUITE.md) from its JSON, and the
README's results block from results/ (run after `altgrad bench`, or after changing how tables are written)."""

from pathlib import Path

from altgrad._bench import README_MARKERS, readme_results, tables

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"

for path, table in tables(RESULTS).items():
  path.write_text(table)
  print(f"{path.relative_to(ROOT)}: rewritten from its JSON")
readme = (ROOT / "README.md").read_text()
begin, end = README_MARKERS
head, rest = readme.split(begin, 1)
_, tail = rest.split(end, 1)
(ROOT / "README.md").write_text(head + readme_results(RESULTS) + tail)
print("README.md: results block rewritten from results/")
