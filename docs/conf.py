"""Sphinx configuration of altgrad's API reference (build: see docs/README.md)."""

import altgrad

project = "altgrad"
release = version = altgrad.__version__
extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",  # Google-style "Args:" / "Returns:" sections, as the docstrings use
  "sphinx.ext.mathjax",
  "sphinx.ext.doctest",  # runs every page's examples: sphinx-build -b doctest
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: namedtuple fields are not described twice
exclude_patterns = ["_build", "README.md"]
html_theme = "alabaster"
doctest_global_setup = """
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")
"""
