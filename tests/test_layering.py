"""The package's import layering, read statically (tests/import_graph.py).

    python tests/import_graph.py   # prints the graph this test checks
"""

from __future__ import annotations

import os

import import_graph as ig


def test_no_import_cycles_between_subpackages_or_modules():
    edges, _, _ = ig.graph()
    assert {"layers", "models", "checkpoint", "train", "convert", "analysis", "complexity", "data"} <= set(edges)
    assert ig.cycles(edges) == []
    assert ig.cycles(ig.module_graph()) == []


def test_layers_models_then_tools_then_clis():
    edges, where, _ = ig.graph()
    bad = ig.violations(edges)
    assert bad == [], [f"{a} -> {b}: {where[(a, b)]}" for a, b in bad]
    assert edges["layers"] <= {"cli"} and edges["models"] <= {"layers", "cli"}
    assert edges["checkpoint"] <= {"cli"}  # the reader knows files, not models
    for tool in ("train", "convert", "analysis", "complexity", "data"):
        assert not edges[tool] & {"evaluate", "config_helpers"}, tool


def test_no_test_code_in_the_package():
    assert not os.path.exists(os.path.join(ig.ROOT, ig.PACKAGE, "testing"))


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


def test_config_helpers_import_only_config_code():
    """What a config file imports (halluvit_jax.config_helpers) loads no trainer, converter or
    analysis code (the package root itself brings the model API: ``hv.create_model``, ``hv.load``)."""
    import subprocess
    import sys

    code = ("import sys, halluvit_jax.config_helpers; "
            "print(sorted(m for m in sys.modules if m.startswith(('halluvit_jax.train', 'halluvit_jax.convert', "
            "'halluvit_jax.analysis', 'halluvit_jax.aot', 'halluvit_jax.evaluate'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ig.ROOT)
    assert out.stdout.strip() == "[]"


def test_the_train_step_imports_without_the_input_pipeline():
    """A JAX project that takes our model and train step but feeds its own data (or a GPU host
    without TFDS and grain, as benchmarks/gpu.sh runs on) imports no grain, TFDS or trainer:
    ``halluvit_jax.train`` and ``halluvit_jax.data`` resolve their names on first use."""
    import subprocess
    import sys

    code = ("import sys, halluvit_jax.models, halluvit_jax.reparam, halluvit_jax.train.steps; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grain', 'tensorflow_datasets') "
            "or m in ('halluvit_jax.train.trainer', 'halluvit_jax.data.pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ig.ROOT)
    assert out.stdout.strip() == "[]"
    # ... and the package-level names still resolve, to the same objects.
    code = ("import halluvit_jax.train as t, halluvit_jax.data as d, halluvit_jax.train.trainer as tr, "
            "halluvit_jax.data.pipeline as p; "
            "assert t.train_and_evaluate is tr.train_and_evaluate and d.create_train_iter is p.create_train_iter; "
            "assert 'train_step' in dir(t) and 'ManualDirError' in dir(d); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ig.ROOT)
    assert out.stdout.strip() == "ok"
