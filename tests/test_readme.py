"""The README's first two commands are the ones a fresh machine runs; CI runs the second."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_starts_with_install_and_main_job_then_tests():
    main_job, tests = _readme_commands()
    assert "pip install" in main_job and "train.py" in main_job
    assert "pip install" in tests and "pytest" in tests


def _ci_tiers() -> dict[str, str]:
    ci = (ROOT / ".ci" / "run").read_text()
    # Each tier may run under a wall-clock bound (`timeout ... 20m python -m pytest ...`).
    return dict(re.findall(r"^run_tier (\w+) (?:timeout [^\n]*?\d+m )?(python -m pytest .*)$", ci, flags=re.M))


def test_ci_runs_exactly_the_readme_test_command_then_the_slow_tier():
    _, tests = _readme_commands()
    pytest_cmd = [line for line in re.split(r"\s*&&\s*|\n", tests) if "pytest" in line][-1].strip()
    tiers = _ci_tiers()
    assert list(tiers) == ["fast", "slow"], tiers
    assert tiers["fast"] == pytest_cmd, (tiers["fast"], pytest_cmd)
    assert tiers["slow"] == "python -m pytest -n 2 --dist loadfile -m slow"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^for name in fast slow; do$", ci, flags=re.M), "both tiers must gate"


def test_ci_install_is_checked_and_gates():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^python -m pip check$", ci, flags=re.M), "pip check must run and gate"
    assert "|| true" not in ci and "set -euo pipefail" in ci
    _, tests = _readme_commands()
    install = re.search(r'pip install (-e "?\.\[[^]]*\]"?)', tests).group(1)
    assert f"pip install -q {install}" in ci, "CI installs what the README's command installs"


def test_test_extra_installs_onnx_and_tpu_and_tpu_pins_our_jax():
    """The README's test command installs the extras its tests need, and [tpu]'s jax[tpu] is
    the jax floor of the dependencies exactly (libtpu must match jaxlib)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "halluvit-jax[onnx,tpu]" in extras["test"]
    (jax_dep,) = [d for d in project["dependencies"] if re.match(r"jax\b(?![-\w])", d)]
    (tpu_dep,) = extras["tpu"]
    floor = re.search(r">=([\w.]+)", jax_dep).group(1)
    assert re.match(rf"jax\[tpu\]=={re.escape(floor)}\b", tpu_dep), (jax_dep, tpu_dep)


def test_readme_layer_example_runs_and_folds_exactly():
    text = (ROOT / "README.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "y_eval" in c)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    import numpy as np

    block, variables, updates, x = (scope[k] for k in ("block", "variables", "updates", "x"))
    want = np.asarray(block.apply({**variables, **updates}, x, (14, 14)))
    got = np.asarray(scope["y_eval"])
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5
