"""altgrad as a user installs it: one version, a built wheel, the notebooks' install cell."""

import json
import os
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import altgrad

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _install_cell(path: Path) -> str:
  cells = json.loads(path.read_text())["cells"]
  return next("".join(c["source"]) for c in cells if c["cell_type"] == "code" and "ALTGRAD_SOURCE" in "".join(c["source"]))


def test_every_notebook_installs_from_the_repository_named_in_pyproject():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  cells = {_install_cell(path) for path in NOTEBOOKS}
  assert len(cells) == 1  # one install cell, the same in every notebook
  assert f'"altgrad @ git+{project["urls"]["Repository"]}"' in cells.pop()
  assert project["dynamic"] == ["version"]  # the version is written once, in altgrad/__init__.py


@pytest.mark.slow
def test_install_cell_installs_a_built_wheel_in_a_fresh_environment(tmp_path):
  """The notebooks' first cell, in a new virtual environment with ALTGRAD_SOURCE set to a wheel
  built from this checkout: pip installs it there and altgrad imports from there. The new
  environment sees this one's packages (a .pth file), so pip finds the dependencies installed
  and the test stays quick and offline; .ci/run installs the wheel and the sdist with their
  dependencies into empty environments."""
  dist, venv = tmp_path / "dist", tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT], check=True, capture_output=True)
  (wheel,) = dist.glob("altgrad-*.whl")
  subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  python = venv / "bin" / "python"
  fresh_site = subprocess.run(
    [python, "-c", "import site; print(site.getsitepackages()[0])"], check=True, capture_output=True, text=True
  ).stdout.strip()
  Path(fresh_site, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env |= {"ALTGRAD_SOURCE": str(wheel), "JAX_PLATFORMS": "cpu"}
  cell = _install_cell(NOTEBOOKS[0])
  check = "\nimport altgrad; print(altgrad.__file__, altgrad.__version__)"
  out = subprocess.run(
    [python, "-c", cell + check], cwd=tmp_path, env=env, check=True, capture_output=True, text=True, timeout=900
  ).stdout
  assert "on cpu" in out  # the cell says which device it runs on
  location, version = out.split()[-2:]
  assert Path(location).is_relative_to(venv) and version == altgrad.__version__
