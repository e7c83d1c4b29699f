"""The CI tier times in README.md and docs/testing.md come from a .ci/run log:
benchmarks/ci_times.py reads what .ci/run prints, and render_docs turns it into the sentence."""

import importlib.util
import json
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ci_lines(**values):
    """The lines .ci/run's own printf statements print, with these values filled in by bash."""
    script = (ROOT / ".ci" / "run").read_text()
    formats = re.findall(r"printf '(CI: [^']*)'", script)
    assert len(formats) == 2, formats  # the per-tier line and the whole-job line
    tier, job = formats
    out = []
    for name in ("fast", "slow"):
        out.append(subprocess.run(["bash", "-c", f"printf '{tier}' {name} {values[name + '_exit']} "
                                   f"{values[name] // 60} {values[name] % 60}"],
                                  capture_output=True, text=True, check=True).stdout)
    out.append(subprocess.run(["bash", "-c", f"printf '{job}' {values['job'] // 60} {values['job'] % 60} "
                               "'0.52 1.10 2.00'"], capture_output=True, text=True, check=True).stdout)
    return out


def test_parses_what_ci_run_prints_and_renders_the_sentence(tmp_path):
    ci_times, render = _module("ci_times"), _module("render_docs")
    start = re.search(r'echo "(CI: commit) .*', (ROOT / ".ci" / "run").read_text())
    assert start, "the start line ci_times.py reads is gone from .ci/run"
    ends = _ci_lines(fast=321, slow=2608, job=3020, fast_exit=0, slow_exit=1)
    log = "\n".join([
        "CI: commit abc1234, 2026-12-03 17:01:02 UTC, 2 CPUs, load average 0.10 0.20 0.30",
        "CI: tier 'fast': timeout --kill-after=30 20m python -m pytest -n 2 --dist loadfile -m not slow",
        "=========== 478 passed, 8 skipped, 26 warnings in 319.39s (0:05:19) ============",
        "CI: tier 'slow': timeout --kill-after=30 70m python -m pytest -n 2 --dist loadfile -m slow",
        "================ 1 failed, 173 passed, 44 warnings in 2606.20s (0:43:26) =================",
    ]) + "\n" + "".join(ends)
    (tmp_path / "ci.log").write_text(log)
    out = tmp_path / "ci.json"
    assert ci_times.main([str(tmp_path / "ci.log"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    ci = report["ci"]
    assert ci["commit"] == "abc1234" and ci["cpus"] == 2 and ci["load_average_start"] == [0.1, 0.2, 0.3]
    assert ci["tiers"]["fast"]["counts"] == {"passed": 478, "skipped": 8, "warning": 26}
    assert ci["tiers"]["slow"]["exit"] == 1 and ci["tiers"]["slow"]["wall_seconds"] == 2608
    assert ci["job_wall_seconds"] == 3020 and ci["load_average_end"] == [0.52, 1.1, 2.0]
    text = render.render_ci(report)
    assert "the fast tier took 5 min 21 s (478 passed, 8 skipped)" in text
    assert "the slow tier 43 min 28 s (1 failed, 173 passed, exit 1)" in text
    assert "the whole job 50 min 20 s with the install" in text


def test_a_log_without_a_finished_tier_is_refused(tmp_path, capsys):
    ci_times = _module("ci_times")
    (tmp_path / "ci.log").write_text("CI: tier 'fast': pytest\n")
    assert ci_times.main([str(tmp_path / "ci.log"), "--json", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no finished fast or slow tier" in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("doc", ["README.md", "docs/testing.md"])
def test_the_docs_quote_the_ci_times_only_through_the_rendered_block(doc):
    text = (ROOT / doc).read_text()
    assert "<!-- render:ci benchmarks/results/ci.json -->" in text
    outside = re.sub(r"<!-- render:.*?<!-- /render -->", "", text, flags=re.S)
    assert not re.search(r"\d+ min \d+ s", outside), "a hand-written tier time outside the block"
