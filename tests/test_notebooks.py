"""Every notebook runs top to bottom (a broken notebook fails CI), and each ``.ipynb`` is its
jupytext percent-format ``.py`` (the source: edit it, then ``jupytext --sync notebooks/*.py``)."""

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  errors = [
    o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
  ]
  assert not errors


def test_there_is_a_quickstart():
  assert "quickstart.ipynb" in [p.name for p in NOTEBOOKS]


def _cells(notebook) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_the_notebook_is_its_python_source(path):
  source = path.with_suffix(".py")
  assert source.exists(), f"{path.name} has no jupytext source {source.name}"
  assert _cells(nbformat.read(path, as_version=4)) == _cells(jupytext.read(source)), (
    f"{path.name} differs from {source.name}: run jupytext --sync {source}"
  )


def test_every_python_source_has_its_notebook():
  sources = {p.stem for p in NOTEBOOKS[0].parent.glob("*.py")}
  assert sources == {p.stem for p in NOTEBOOKS}
