"""The package's import layering, read statically (halluvit_jax.testing.import_graph).

    python -m halluvit_jax.testing.import_graph   # prints the graph this test checks
"""

from __future__ import annotations

from halluvit_jax.testing import import_graph as ig


def test_no_import_cycles_between_subpackages_or_modules():
    edges, _, _ = ig.graph()
    assert {"layers", "models", "train", "convert", "analysis", "complexity", "data"} <= set(edges)
    assert ig.cycles(edges) == []
    assert ig.cycles(ig.module_graph()) == []


def test_layers_models_then_tools_then_clis():
    edges, where, _ = ig.graph()
    bad = ig.violations(edges)
    assert bad == [], [f"{a} -> {b}: {where[(a, b)]}" for a, b in bad]
    assert edges["layers"] <= {"cli"} and edges["models"] <= {"layers", "cli"}
    for tool in ("train", "convert", "analysis", "complexity", "data"):
        assert not edges[tool] & {"evaluate", "config_helpers", "testing"}, tool


def test_function_local_imports_only_for_optional_dependencies():
    _, _, local = ig.graph()
    assert [line for line in local if not line.endswith("(optional)")] == []


def test_the_checker_sees_a_cycle_and_a_violation():
    assert ig.cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert ig.violations({"layers": {"models"}, "train": {"convert"}, "models": {"layers"}}) == [
        ("layers", "models"), ("train", "convert")]


def test_the_command_prints_the_graph(capsys):
    assert ig.main([]) == 0
    out = capsys.readouterr().out
    assert "models       -> layers" in out and "cycles: none" in out and "layering violations: none" in out
