"""The README's first two commands are the ones a fresh machine runs; CI runs the second."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_starts_with_install_and_main_job_then_tests():
    main_job, tests = _readme_commands()
    assert "pip install" in main_job and "train.py" in main_job
    assert "pip install" in tests and "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
    _, tests = _readme_commands()
    pytest_cmd = [line for line in re.split(r"\s*&&\s*|\n", tests) if "pytest" in line][-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest")]
    assert ci_lines == [pytest_cmd], (ci_lines, pytest_cmd)


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
