"""Writes the README's results block from results/ (run after `altgrad bench`)."""

from pathlib import Path

from altgrad._bench import README_MARKERS, readme_results

ROOT = Path(__file__).resolve().parent.parent

readme = (ROOT / "README.md").read_text()
begin, end = README_MARKERS
head, rest = readme.split(begin, 1)
_, tail = rest.split(end, 1)
(ROOT / "README.md").write_text(head + readme_results(ROOT / "results") + tail)
print("README.md: results block rewritten from results/")
