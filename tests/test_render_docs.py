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


def _aot_program(flops, bytes_accessed, peak, compile_s, **extra):
    return {"cost": {"flops": flops, "bytes_accessed": bytes_accessed}, "memory": {"peak": peak},
            "compile_s": compile_s, **extra}


def test_aot_table_computes_hal_over_base(render):
    info = {"compute_dtype": "bfloat16", "per_chip_batch": 128.0, "mesh": {"data": 4}}
    meta = {"topology": "v5e:2x2", "chips": 4, "device_kind": "TPU v5 lite", "hbm_gib": 16.0, "jax": "0.10.2",
            "info": info, "measured": {"date": "2026-12-03 10:00:00 UTC"}}
    table = {"command": "python benchmarks/aot_table.py run", "configs": {
        "deit_s": {**meta, "programs": {"deploy_forward": _aot_program(2e12, 10e9, 2**30, 300.4)}},
        "deit_s_hal": {**meta, "programs": {"deploy_forward": _aot_program(1.5e12, 12e9, 2**29, 400.0)},
                       "timed_out_s": {"train_step": 1800}}}}
    text = render.render_aot(table)
    # 1.5 / 2 = 0.75, 12 / 10 = 1.2, 0.5 GiB / 1 GiB = 0.5: ratios computed, not typed.
    assert "| DeiT-S | 2.000 -> 1.500 (0.75x) | 10.00 -> 12.00 (1.20x) | 1.00 -> 0.50 (0.50x) | 300 / 400 |" in text
    assert "| DeiT-S | not compiled | not compiled | not compiled | - / > 1800 |" in text
    assert "| NextViT-S | not compiled |" in text and "compiled 2026-12-03" in text


def test_aot_finite_computes_the_kernels_removed_and_the_ratios(render):
    def variant(kernels, cpu, wall, mbytes):
        prog = _aot_program(1e9, mbytes * 1e6, 2**20 * 100, wall - 10, kernels=kernels, lower_s=10.0,
                            lower_cpu_s=5.0, compile_cpu_s=cpu - 5.0)
        return {"programs": {"train_step": prog}, "load_average_after": [9.0, 8.0, 7.0]}

    report = {"command": "python benchmarks/aot_finite_check.py --json x.json", "date": "2026-12-03 19:00:00 UTC",
              "git_commit": "abc1234", "versions": {"jax": "0.10.2", "libtpu": "0.0.42.1"},
              "machine": {"cores": 2, "load_average_start": [4.0, 3.0, 2.0]},
              "settings": {"config": "configs/deit_t_hal.py:data=demo", "topology": "v5e:2x2", "per_chip_batch": 4,
                           "compute_dtype": "bfloat16"},
              "variants": {"per_leaf": variant(2000, 100.0, 400.0, 750.0),
                           "from_norms": variant(1200, 80.0, 200.0, 450.0)}}
    text = render.render_aot_finite(report)
    # CPU share 100 / 400 = 25%, 80 / 200 = 40%; 1200 / 2000 = 0.60x; 450 / 750 = 0.60x; 800 removed = 40%.
    assert "| guard per leaf (before) | 2000 | 100 | 400 | 25% | 750 | 1.00 | 100 |" in text
    assert "| guard from the norms (after) | 1200 | 80 | 200 | 40% | 450 | 1.00 | 100 |" in text
    assert "| after / before | 0.60x | 0.80x | 0.50x | - | 0.60x | 1.00x | 1.00x |" in text
    assert "removes 800 of the 2000 kernels (40%)" in text
    assert "under load" in text and "4.0/3.0/2.0, 9.0/8.0/7.0, 9.0/8.0/7.0" in text
