"""The benchmark tables of README.md and docs/benchmarks.md are what benchmarks/render_docs.py
renders from the committed JSON in benchmarks/results/ (so every median and ratio there is
computed by code), and the check catches a hand-edited figure."""

import importlib.util
import json
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benchmarks" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tables_match_their_json(render, capsys):
    assert render.main(["--check"]) == 0, capsys.readouterr().out[-3000:]


def test_every_marked_block_names_a_committed_result(render):
    seen = set()
    for doc in render.DOCS:
        for _, kind, path, _, _ in render.MARKER.findall((ROOT / doc).read_text()):
            assert kind in render.RENDERERS and (ROOT / path).is_file(), (doc, kind, path)
            seen.add(path)
    results = {f"benchmarks/results/{p.name}" for p in (ROOT / "benchmarks" / "results").glob("*.json")}
    assert seen and seen <= results


def _report(rounds_base, rounds_hal):
    """A models.py report in miniature: two rows and one hal speedup, three rounds."""
    row = lambda name, form, values: {
        "framework": "jax", "model": name, "form": form, "mode": "infer", "variant": "auto",
        "images_per_s": sorted(values)[1], "images_per_s_rounds": values, "peak_rss_mib": 900.0,
        "xla_memory": {"peak_mib": 315.4}, "mfu": 0.5}
    speedups = [b and h / b for b, h in zip(rounds_base, rounds_hal)]
    return {
        "results": [row("deit_small", "train", rounds_base), row("deit_small_hal", "deploy", rounds_hal)],
        "hal_speedups": [{"model": "deit_small_hal", "mode": "infer", "form": "deploy", "variant": "auto",
                          "baseline_variant": "auto", "speedup_rounds": speedups, "flop_ideal": 1.25}],
    }


def test_render_computes_medians_and_check_catches_a_hand_edit(render, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "r.json").write_text(json.dumps(_report([10.0, 20.0, 30.0], [12.0, 22.0, 36.0])))
    marked = "<!-- render:speedups r.json -->\nold\n<!-- /render -->\n"
    (tmp_path / "README.md").write_text("# x\n" + marked + "after\n")
    (tmp_path / "docs" / "benchmarks.md").write_text("<!-- render:models r.json -->\n<!-- /render -->\n")
    (tmp_path / "docs" / "conversion.md").write_text("no marked block\n")
    assert render.main(["--check", "--root", str(tmp_path)]) == 1  # stale: "old"
    assert render.main(["--root", str(tmp_path)]) == 0
    assert render.main(["--check", "--root", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    # Per-round speedups 1.2, 1.1, 1.2: median 1.2 (not the mean 1.167); 1.2 / 1.25 = 0.96.
    assert "| DeiT-S-hal (deploy) | infer | 1.200, 1.100, 1.200 | 1.200x | 1.250x | 0.96 |" in readme
    assert readme.startswith("# x\n") and readme.endswith("<!-- /render -->\nafter\n")
    table = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| DeiT-S | infer | 20.00 (10.00, 20.00, 30.00) |" in table
    assert re.search(r"\| 315 \| 50% \|", table)
    # A hand-edited figure is caught.
    (tmp_path / "README.md").write_text(readme.replace("1.200x", "1.250x"))
    capsys.readouterr()
    assert render.main(["--check", "--root", str(tmp_path)]) == 1
    assert "1.250x" in capsys.readouterr().out


def test_median_of_an_even_count_is_the_mean_of_the_middle_two(render):
    """The docs' median of two rounds is their mean, never the larger one."""
    text = render.render_speedups(_report([10.0, 10.0], [9.0, 10.0]))
    assert "| 0.900, 1.000 | 0.950x |" in text


def test_no_stale_names_in_the_benchmark_docs():
    for doc in ("README.md", "docs/benchmarks.md"):
        text = (ROOT / doc).read_text()
        for stale in ("SplitDense", "attention_core.dot_product_attention", "layers/conv.py"):
            assert stale not in text, (doc, stale)
    assert os.path.isfile(ROOT / "halluvit_jax" / "layers" / "fused" / "conv.py")


def test_quoted_commands_are_the_ones_that_wrote_the_results():
    """A command line in docs/benchmarks.md that writes a committed result is the very command
    stored in that result."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for line in text.splitlines():
        m = re.search(r"--json (benchmarks/results/\S+\.json)$", line)
        if m and (ROOT / m.group(1)).is_file():
            assert line.strip() == json.loads((ROOT / m.group(1)).read_text())["command"]


def test_onnx_ops_table_lists_every_op_of_both_graphs(render):
    """An op present in one graph only appears with a 0 in the other column; totals and errors
    come from the report."""
    report = {"results": [{"model": "deit_small_hal", "before": {"Add": 3, "Erf": 1}, "after": {"Add": 2, "Gelu": 1},
                           "nodes_before": 4, "nodes_after": 3, "rel_error_before": 1.94e-6,
                           "rel_error_after": 2.06e-6}]}
    text = render.render_onnx_ops(report)
    assert "| op | DeiT-S-hal before | DeiT-S-hal after |" in text
    assert "| `Add` | 3 | 2 |" in text and "| `Erf` | 1 | 0 |" in text and "| `Gelu` | 0 | 1 |" in text
    assert "| **nodes** | **4** | **3** |" in text and "| logit error (relative) | 1.9e-06 | 2.1e-06 |" in text


def test_deploy_table_computes_medians_ratios_and_share_of_ideal(render):
    """hal/base is the median of the per-round ratios, its share of the ideal divides by
    MACs(base)/MACs(hal), base/timm the median of the per-round ratios; the load is quoted."""
    report = {"machine": {"cpu": "X", "cores": 2, "load_average_before_each_round": [[3.0, 2.0, 1.0]],
                          "load_average_end": [4.0, 2.0, 1.0]},
              "versions": {"onnxruntime": "1.32.0"}, "date": "2026-12-03 19:00:00 UTC", "git_commit": "abc",
              "command": "python benchmarks/deploy.py --rounds 3",
              "config": {"rounds": 3, "iters": 10, "warmup": 2, "threads": 0},
              "rows": [{"model": "deit_small", "batch": 32, "flop_ideal": 1.25,
                        "images_per_s_rounds": {"base": [10.0, 20.0, 40.0], "hal": [11.0, 24.0, 40.0],
                                                "timm": [20.0, 20.0, 20.0]},
                        "max_rel_logit_error_vs_jax": {"base": 1.2e-6, "hal": 2.0e-6},
                        "onnx_bytes": {"base": 2**20, "hal": 2**19, "timm": 3 * 2**20}}]}
    text = render.render_deploy(report)
    # hal/base per round 1.1, 1.2, 1.0: median 1.1 (not the ratio of the medians, 24/20); / 1.25 = 0.88.
    assert "| DeiT-S | exported | 32 | 20.0 | 24.0 | 1.100 (1.100, 1.200, 1.000) | 1.250 | 0.88 |" in text
    # base/timm 0.5, 1.0, 2.0 -> 1.00; hal/timm 0.55, 1.2, 2.0 -> 1.20.
    assert "| 20.0 | 1.00 | 1.20 |" in text
    assert "| DeiT-S | exported | 1.2e-06 / 2.0e-06 | 1.0 / 0.5 / 3.0 |" in text
    assert "3.0/2.0/1.0 before the rounds, 4.0/2.0/1.0 at the end" in text
