"""No function of the package is longer than 120 lines (issue 23): a long function is a sign
that one job has several homes or one home several jobs."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "halluvit_jax")
MAX_LINES = 120


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """``[(qualified name, lines)]`` of the functions (methods, nested ones) over ``limit`` lines,
    decorators and docstring included."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                    if child.end_lineno - first + 1 > limit:
                        out.append((name, child.end_lineno - first + 1))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def _package_files() -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(PACKAGE) for f in files if f.endswith(".py"))


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: os.path.relpath(p, PACKAGE))
def test_no_function_is_over_120_lines(path):
    with open(path) as f:
        assert long_functions(f.read()) == []


def test_the_checker_counts_methods_nested_functions_and_decorators():
    body = "\n".join(f"    x{i} = {i}" for i in range(118))
    source = f"@deco\ndef f():\n{body}\n\nclass C:\n    def g(self):\n        def h():\n{body.replace('    ', '            ')}\n"
    assert long_functions(source) == []
    assert long_functions(source, 119) == [("f", 120), ("C.g", 120)]
    assert long_functions(source, 118) == [("f", 120), ("C.g", 120), ("C.g.h", 119)]
