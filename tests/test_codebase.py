"""The shape of the code itself: functions that fit a screen, an explicit public surface."""

import ast
from pathlib import Path

import pytest

import altgrad
from altgrad import data, diagnostics, losses, nn, rules, train

PACKAGE = Path(altgrad.__file__).parent
#: Lines of code (the docstring excluded) a function of the library may take.
MAX_LINES = 60


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
  body = node.body
  docstring = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
  first = body[1] if docstring and len(body) > 1 else body[0]
  return node.end_lineno - first.lineno + 1


def test_no_function_is_longer_than_a_screen():
  long = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_LINES:
        long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({_code_lines(node)} lines)")
  assert not long, f"functions over {MAX_LINES} lines of code: {long}"


def test_the_length_check_counts_code_not_docstrings():
  tree = ast.parse('def f():\n  """doc\n\n  more doc\n  """\n  a = 1\n  return a\n')
  assert _code_lines(tree.body[0]) == 2


@pytest.mark.parametrize("module", [altgrad, data, diagnostics, losses, nn, rules, train], ids=lambda m: m.__name__)
def test_every_public_module_lists_its_names(module):
  names = getattr(module, "__all__", None)
  assert names, f"{module.__name__} has no __all__"
  assert all(hasattr(module, name) for name in names), f"{module.__name__}.__all__ names something it lacks"
