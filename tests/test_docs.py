"""Every public name has a docstring that says what it is (issue #7)."""

import dataclasses
import inspect
import typing

import pytest

import altgrad
from altgrad import data, diagnostics, losses, nn, rules, train

MODULES = [altgrad, data, diagnostics, losses, nn, rules, train]


def _public(module):
  names = getattr(module, "__all__", None)
  if names is None:
    names = [
      n
      for n, v in vars(module).items()
      if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
    ]
  return [(f"{module.__name__}.{n}", getattr(module, n)) for n in names]


def _documented_objects():
  for module in MODULES:
    yield module.__name__, module
    for name, value in _public(module):
      if inspect.ismodule(value) or not (inspect.isclass(value) or callable(value)):
        continue
      if typing.get_origin(value) is not None:  # a type alias: documented by its #: comment
        continue
      yield name, value
      if inspect.isclass(value):
        for attr, member in vars(value).items():
          if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
            continue
          yield f"{name}.{attr}", member


OBJECTS = dict(_documented_objects())


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_public_name_has_a_docstring(name):
  value = OBJECTS[name]
  doc = inspect.getdoc(value) if not isinstance(value, property) else value.fget.__doc__
  assert doc and doc.strip(), f"{name} has no docstring"
  if inspect.isclass(value) and (dataclasses.is_dataclass(value) or issubclass(value, tuple)):
    assert not doc.startswith(f"{value.__name__}("), f"{name} has only the generated signature as docstring"


def test_the_rules_name_their_papers():
  for name in ("node_perturbation", "target_propagation", "expectation_reflection", "consequentialism"):
    module = inspect.getmodule(getattr(rules, name))
    assert "arXiv:" in module.__doc__, f"{name}'s module does not cite its paper"


def test_the_readme_results_are_the_bench_output():
  """The README's results block is what tools/readme_results.py makes of results/: no number in
  it is edited by hand."""
  from pathlib import Path

  from altgrad._bench import README_MARKERS, readme_results

  root = Path(__file__).resolve().parent.parent
  readme = (root / "README.md").read_text()
  begin, end = README_MARKERS
  block = begin + readme.split(begin, 1)[1].split(end, 1)[0] + end
  assert block == readme_results(root / "results"), "run: python tools/readme_results.py"


def test_every_suite_table_is_its_json():
  """results/SUITE.md (and results/gpu/) is what the report makes of its SUITE.json, the perf
  table included (tables change with the report's code, not by hand)."""
  from pathlib import Path

  from altgrad._bench import tables

  root = Path(__file__).resolve().parent.parent
  found = tables(root / "results")
  assert root / "results" / "perf.md" in found and root / "results" / "gpu" / "cw.md" in found
  for path, table in found.items():
    assert path.read_text() == table, f"{path.relative_to(root)}: run python tools/readme_results.py"


def test_the_api_reference_has_a_page_entry_for_every_public_class_and_function():
  """docs/ (Sphinx) documents every public rule, layer and training name; losses, data and
  diagnostics are documented whole (automodule with members)."""
  from pathlib import Path

  text = "\n".join(p.read_text() for p in (Path(__file__).resolve().parent.parent / "docs").rglob("*.rst"))
  for module in (losses, data, diagnostics):
    assert f".. automodule:: {module.__name__}\n   :members:" in text
  missing = [
    name
    for module in (rules, nn, train)
    for name, value in _public(module)
    if (inspect.isclass(value) or inspect.isfunction(value)) and f":: {name}\n" not in text
  ]
  assert not missing, f"not in docs/: {missing}"


_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
_CITED = r"(?<![\w/.])((?:docs|results|tools|notebooks|tests|altgrad)/[\w/.-]*\w\.(?:md|rst|py|json|png|ipynb))"


def _sources():
  for folder, pattern in (("altgrad", "**/*.py"), ("tests", "*.py"), ("tools", "*.py"), ("docs", "**/*.rst")):
    yield from sorted((_ROOT / folder).glob(pattern))


def test_every_document_the_code_and_docs_cite_exists():
  """Docstrings, comments and doc pages point only at files in this repository: no design notes
  or specs kept elsewhere."""
  import re
  from pathlib import Path

  missing, elsewhere = [], []
  for path in _sources():
    text = path.read_text()
    where = path.relative_to(_ROOT)
    cited = [c for c in re.findall(_CITED, text) if not Path(c).stem.isupper()]  # SUITE.md: a placeholder
    missing += [f"{where}: {c}" for c in cited if not (_ROOT / c).exists()]
    elsewhere += [f"{where}: {m}" for m in re.findall(r"\bspec/\w+\." + "md|DESIGN" + r"\.md", text)]
  assert not missing, f"cited files that do not exist: {missing}"
  assert not elsewhere, f"citations of documents outside the repository: {elsewhere}"
