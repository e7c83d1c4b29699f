"""scripts/mutation_checks.py shows the guarding tests fail on a broken copy; this keeps its list
of mutations applicable: each text to change is still in its file exactly once, and each test it
names still exists (so the script cannot pass by breaking nothing or by running no test)."""

import importlib.util
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_checks", ROOT / "scripts" / "mutation_checks.py")
mutation_checks = importlib.util.module_from_spec(spec)
sys.modules.setdefault("mutation_checks", mutation_checks)  # dataclasses look their module up
spec.loader.exec_module(mutation_checks)


@pytest.mark.parametrize("mutation", mutation_checks.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_still_applies_and_names_existing_tests(mutation, tmp_path):
    source = (ROOT / mutation.path).read_text()
    assert source.count(mutation.old) == 1, f"{mutation.name}: update its text in scripts/mutation_checks.py"
    target = tmp_path / mutation.path
    target.parent.mkdir(parents=True)
    target.write_text(source)
    mutation_checks.apply(mutation, str(tmp_path))
    assert target.read_text() != source
    for node in mutation.tests:
        path, _, name = node.partition("::")
        func = name.split("[")[0]
        assert re.search(rf"^def {func}\(", (ROOT / path).read_text(), re.M), node


def test_a_stale_mutation_is_a_clear_error(tmp_path):
    m = mutation_checks.MUTATIONS[0]
    (tmp_path / m.path).parent.mkdir(parents=True)
    (tmp_path / m.path).write_text("nothing to change here\n")
    with pytest.raises(ValueError, match=r"occurs 0 times .* update MUTATIONS"):
        mutation_checks.apply(m, str(tmp_path))
