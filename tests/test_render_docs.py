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


def test_machine_line_says_when_a_run_stopped_mid_round(render):
    report = json.loads((ROOT / "benchmarks" / "results" / "gpu.json").read_text())
    report["settings"]["rounds"] = 1
    report.update(rounds_completed=0, round_in_progress=True)
    text = render.render_machine(report)
    assert "the median of 1 interleaved round (the run was stopped in round 1 of 1; the rows" in text
    report.update(rounds_completed=1, round_in_progress=False)
    assert "stopped" not in render.render_machine(report)
    report["settings"]["rounds"] = 3
    assert "(1 of the 3 rounds asked for: the run was stopped)" in render.render_machine(report)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two(render):
    """The docs' median of two rounds is their mean, never the larger one."""
    text = render.render_speedups(_report([10.0, 10.0], [9.0, 10.0]))
    assert "| 0.900, 1.000 | 0.950x |" in text


def test_speedup_rows_name_the_hal_impl_and_a_baseline_of_another(render):
    """An accel hal row measured against the baseline's plain row says both."""
    report = _report([10.0, 10.0], [9.0, 10.0])
    report["hal_speedups"] += [{**report["hal_speedups"][0], "variant": "accel", "baseline_variant": "plain"},
                               {**report["hal_speedups"][0], "variant": "plain", "baseline_variant": "cudnn"}]
    text = render.render_speedups(report)
    assert "| DeiT-S-hal (deploy) | infer |" in text
    assert "| DeiT-S-hal (deploy, accel) vs plain baseline | infer |" in text
    assert "| DeiT-S-hal (deploy) vs cudnn baseline | infer |" in text


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


def test_remat_ratios_are_computed_against_none(render):
    report = {"settings": {"model": "deit_small", "batch": 4, "impl": "plain"}, "backend": "cpu",
              "versions": {"jax": "0.0"}, "date": "2026-01-01 00:00:00 UTC", "git_commit": "abc", "command": "x",
              "results": [{"remat": "none", "residual_mib": 400.0, "peak_mib": 1000.0},
                          {"remat": "block", "residual_mib": 100.0, "peak_mib": 1100.0}]}
    text = render.render_remat(report)
    assert "| `none` | 400 MiB | 1.00 | 1000 MiB | 1.00 |" in text
    assert "| `block` | 100 MiB | 0.25 | 1100 MiB | 1.10 |" in text


def test_complexity_full_computes_changes_and_gaps_to_the_quoted_figures(render):
    """PVTv2-b1 baseline at the published 14.01M / 2.12G, hal deploy at -13% / -16%: against the
    paper's -13.2% / -15.2% that is +0.20 / -0.80 points."""
    row = lambda model, form, params, macs, res=224: {"model": model, "form": form, "resolution": res,  # noqa: E731
                                                      "params": params, "macs": macs}
    rows = [row("pvt_v2_b1", "train", 14_010_000, 2.12e9), row("pvt_v2_b1", "deploy", 14_010_000, 2.12e9),
            row("pvt_v2_b1_hal", "train", 14_290_200, 2.226e9),
            row("pvt_v2_b1_hal", "deploy", 12_188_700, 1.7808e9)]
    text = render.render_complexity_full(rows)
    assert "| `pvt_v2_b1` | train / deploy | 14,010,000 | 14.01 | 2.120 | | |" in text
    assert "| `pvt_v2_b1_hal` | train | 14,290,200 | 14.29 | 2.226 | +2.00% | +5.00% |" in text
    assert "| `pvt_v2_b1_hal` | deploy | 12,188,700 | 12.19 | 1.781 | **-13.00%** | **-16.00%** |" in text
    assert "ours -13.00% / -16.00% (+0.20 / -0.80 points)" in text
    assert "All 2 differences are within 0.80 points" in text and "within 0.00% of the published" in text
    assert "(ours 14.01M, +0.00%; 2.120G, +0.00%)" in text
    assert "against 17.3G in the paper (+1.00%)" in render.render_complexity_384(
        [row("nextvit_small", "deploy", 1, 17.473e9, 384)])
    assert "PVTv2-b1 -13.00% parameters and -16.00% MACs" in render.render_complexity_paper(rows)


def _ablation_run(ablation, seed, top1, ccs, params, macs):
    return {f"{ablation}_s{seed}": {"ablation": ablation, "seed": seed, "top1": top1, "ccs": ccs,
                                    "params": params, "macs": macs}}


def test_ablation_summary_computes_cuts_verdicts_and_ranges(render):
    """Baseline 1000 params / 2000 MACs, hal 800 / 1500: cuts of 20% and 25%. Top-1 +10 points
    with s.e. sqrt(4/3 + 4/3) = 1.63: beyond two s.e., so the paper's direction holds."""
    runs = {}
    for seed, (b, h) in enumerate([(0.50, 0.60), (0.52, 0.62), (0.54, 0.64)]):
        runs |= _ablation_run("baseline", seed, b, 0.9, 1000, 2000)
        runs |= _ablation_run("ihh_chh", seed, h, 0.8 + 0.01 * seed, 800, 1500)
    results = {"epochs": 8.0, "runs": runs}
    text = render.render_ablation_summary(results)
    assert "cuts params by 20.0% and MACs by 25.0%" in text
    assert "**1 accuracy direction of the paper holds beyond noise**: `ihh_chh` > `baseline` (Table 1, +10.00 pts)." in text
    assert "mean CCS 0.810 (ihh_chh) vs 0.900 (baseline)" in text
    assert "seed noise (top-1 std over seeds) 2.0-2.0 points" in text
    assert "**No accuracy direction is reversed beyond noise.** The 8-epoch settings reach 52.0-62.0% top-1" in text
    table = render.render_ablations(results)
    assert "| baseline | 3 | 52.00 ± 2.00 | 1,000 | 0.002 M | 0.900 ± 0.000 |" in table
    assert "| +10.00 ± 1.63 pts | holds |" in render.render_ablation_directions(results)


def test_parity_shows_the_fraction_of_the_tolerance_used(render):
    report = {"command": "python benchmarks/parity.py", "backend": "cpu", "versions": {}, "date": "2026-01-01",
              "git_commit": "abc", "results": [{"check": "c", "test": "test_x", "max_abs_diff": 5e-6,
                                                "max_abs_ref": 3.0, "tolerance": 2e-5}]}
    assert "| c | `test_x` | 5.0e-06 | 2.0e-05 | 25.00% |" in render.render_parity(report)


def _demo_report(base_top1, ft_top1, ccs_hal, ccs_base):
    """A benchmarks/demo_figures.py report in miniature (2 blocks of 4 heads)."""
    run = lambda name, epochs, steps, top1: {"name": name, "epochs": epochs, "steps": steps, "batch": 64,
                                             "top1": top1, "top5": 1.0, "wall_s": 75.0,
                                             "command": f"python train.py ({name})"}
    sim = [[1.0, 0.5, 0.9, 0.2], [0.5, 1.0, 0.3, 0.8], [0.9, 0.3, 1.0, 0.4], [0.2, 0.8, 0.4, 1.0]]
    ccs = lambda value, hal: {"ccs": value, "hal": hal, "num_images": 297,
                              "blocks": [{"block": f"blocks_{i}", "heads": 4, "score": value, "similarity": sim}
                                         for i in range(2)]}
    return {"command": "python benchmarks/demo_figures.py", "date": "2026-12-03 19:00:00 UTC", "git_commit": "abc",
            "machine": {"cpu": "Test CPU", "cores": 2, "load_average_start": [6.0, 5.0, 4.0],
                        "load_average_end": [7.0, 6.0, 5.0]},
            "demo": run("demo", 60.0, 1380, 0.963),
            "pipeline": {"baseline": run("baseline", 30.0, 690, base_top1),
                         "converted": {"top1": 0.65, "steps": 0, "wall_s": 28.0, "calibration": {"images": 64},
                                       "report": {"images": 64, "converted": {"cosine": 0.772, "top1_agreement": 0.672},
                                                  "random_init": {"cosine": 0.055, "top1_agreement": 0.0625}}},
                         "finetune": run("finetune", 10.0, 230, ft_top1), "scratch": run("scratch", 10.0, 230, 0.6465),
                         "deploy": {"top1": ft_top1, "wall_s": 11.0, "eval_wall_s": 8.0}},
            "ccs": {"hal": ccs(ccs_hal, True), "baseline": ccs(ccs_base, False)}}


def test_demo_renderers_compute_the_gap_the_ratio_and_the_direction(render):
    """The gap to the baseline, the step ratio, the deploy check, the CCS direction and the head-pair
    ranges are computed from the report, never typed."""
    text = render.render_demo_runs(_demo_report(0.9428, 0.9259, 0.70, 0.74))
    assert "comes within 1.7 points of the baseline trained 3x longer" in text
    assert "| 1 min 15 s |" in text and "92.59% (identical)" in text and "6.2%)" in text
    assert "load average, 1/5/15 min: 6.0/5.0/4.0 at the start, 7.0/6.0/5.0 at the end" in text
    assert "beats by 0.5 points the baseline trained 3x longer" in render.render_demo_runs(_demo_report(0.92, 0.925, 0.70, 0.74))
    assert "the paper's direction" in render.render_demo_ccs_summary(_demo_report(0.94, 0.93, 0.70, 0.74))
    ccs = render.render_demo_ccs(_demo_report(0.94, 0.93, 0.74, 0.70))
    assert "against the paper's direction" in ccs and "| **0.740** |" in ccs
    # block 1 only: real i / hal i pairs (0,2)=0.9 and (1,3)=0.8; real pair (0,1)=0.5; all six pairs 0.2-0.9
    assert "copy of (identity-initialized IHH/CHH, pairs real i / hal i) 0.80-0.90" in ccs
    assert "other 0.50; the baseline's head pairs 0.20-0.90" in ccs


@pytest.mark.slow
def test_demo_figures_quick_renders(render, tmp_path):
    """benchmarks/demo_figures.py --quick (1-epoch runs of the whole demo pipeline) writes a report
    that every demo_* kind renders (minutes of CPU: the slow tier)."""
    import subprocess
    import sys

    out = tmp_path / "demo.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_figures.py"), "--quick", "--workdir",
                    str(tmp_path / "runs"), "--json", str(out)], check=True, cwd=ROOT, capture_output=True)
    report = json.loads(out.read_text())
    assert report["quick"] and report["pipeline"]["finetune"]["steps"] > 0
    for kind in ("demo_train", "demo_progress", "demo_runs", "demo_summary", "demo_ccs_summary", "demo_ccs"):
        assert render.RENDERERS[kind](report).strip()


def _pipeline_report(tf_reps):
    """benchmarks/input_pipeline.py's report in miniature: two chains, two back-ends, the tf.data
    chains they pair with (``tf_reps``: {} = TensorFlow absent) and the fast-decode figures."""
    float_tf, uint8_tf = "tf.data: decode_and_crop|bilinear|flip|normalize", "tf.data: decode_and_crop|bilinear|flip"
    return {
        "command": "python benchmarks/input_pipeline.py --json x.json", "date": "2026-12-03 19:00:00 UTC",
        "git_commit": "abc1234", "machine": {"cpu": "CPU", "cores": 2, "load_average_start": [2.0, 1.5, 1.0]},
        "load_average_end": [3.0, 2.0, 1.0], "versions": {"simplejpeg": "1.9.0"},
        "settings": {"reps": 3, "threads": 2, "batch_size": 32, "batches": 16},
        "dataset": {"train_jpegs": 500, "validation_jpegs": 256, "mean_height_width": [410.0, 413.0]},
        "backends": ["sj", "sj+roi"],
        "cpu_ms_per_image_reps": {"train: rrc|flip|normalize": {"sj": [2.0, 2.0, 2.0], "sj+roi": [1.0, 2.0, 1.5]},
                                  "train: rrc|flip|normalize(on_device=1)": {"sj": [1.44], "sj+roi": [1.2]}},
        "tf_data_cpu_ms_per_image_reps": tf_reps,
        "tf_data_reference": {"train: rrc|flip|normalize": float_tf,
                              "train: rrc|flip|normalize(on_device=1)": uint8_tf},
        "full_pipeline": {"eval": {"images_per_s": 473.4, "cpu_ms_per_image": 3.3341}},
        "fast_decode": {"images": 3, "cpu_ms_per_image_reps": {"0": [2.0, 2.4, 2.0], "1": [1.8], "2": [1.5]},
                        "psnr_db": {"1": [44.0, 46.0, 45.0], "2": [41.0, 45.0, 43.0]},
                        "mean_abs_diff": {"1": [1.0, 1.1, 1.2], "2": [1.1, 1.4, 1.2]}, "identical_images": {"1": 0, "2": 0}},
    }


def test_input_pipeline_renders_computed_ratios_and_no_tf_rows_without_tensorflow(render):
    """Medians of the repetitions, ours / tf.data, tf.data's cost split and the fast-decode
    saving are computed by the renderer; without TensorFlow no tf.data figure or verdict appears."""
    tf = {"tf.data: decode_and_crop": [0.8], "tf.data: decode_and_crop|bilinear|flip": [1.6],
          "tf.data: decode_and_crop|bilinear|flip|normalize": [3.0, 3.2, 2.8]}
    report = _pipeline_report(tf)
    table = render.render_input_pipeline(report)
    # sj+roi runs 1.0, 2.0, 1.5: median 1.5, below sj's 2.0, so it is the best back-end; 1.5 / 3.0.
    assert "| train: `rrc\\|flip\\|normalize` | 2.000 | 1.500 | sj+roi: 1.000, 2.000, 1.500 |" in table
    assert "| train: `rrc\\|flip\\|normalize` | `decode_and_crop\\|bilinear\\|flip\\|normalize` | 0.50x |" in table
    assert "| train: `rrc\\|flip\\|normalize(on_device=1)` | `decode_and_crop\\|bilinear\\|flip` | 0.75x |" in table
    assert "| eval | 473 | 3.334 |" in table and "2.0/1.5/1.0 at the start, 3.0/2.0/1.0 at the end" in table
    target = render.render_input_pipeline_target(report)
    assert "met in this run" in target and "0.50x" in target and "0.75x" in target
    assert "0.90x without the optional `[fastjpeg]`" in target  # sj alone: 1.44 / 1.6
    # tf.data: crop 0.8, + resize and flip 1.6 - 0.8, + normalization 3.0 - 1.6.
    assert "alone 0.800 ms; resize to 224 and flip add 0.800 ms (bilinear)" in target
    assert "normalization adds 1.400 ms" in target
    fast = render.render_fast_decode(report)
    # fast=0 runs 2.0, 2.4, 2.0: median 2.0; fast=2 1.5 is 25% cheaper; PSNR median 43.0.
    assert "`2` is 41.0-45.0 dB PSNR (median 43.0; mean absolute difference 1.10-1.40" in fast
    assert "25% cheaper (1.500 vs 2.000 CPU-ms/img)" in fast and "10% cheaper" in fast
    absent = _pipeline_report({})
    assert "no tf.data rows" in render.render_input_pipeline(absent)
    target = render.render_input_pipeline_target(absent)
    assert "not judged by this run" in target and "x " not in target.replace("x (", "")


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
    # 1.5 / 2 = 0.75, 12 / 10 = 1.2, 0.5 GiB / 1 GiB = 0.5: ratios computed, not typed. Roofline
    # on a v5e (197 TFLOP/s, 819 GB/s): 10 GB take 12.2 ms, more than 2 TFLOP's 10.2 ms.
    assert ("| DeiT-S | 2.000 -> 1.500 (0.75x) | 10.00 -> 12.00 (1.20x) | 12.2 -> 14.7 (1.20x) "
            "| 1.00 -> 0.50 (0.50x) | 300 / 400 |") in text
    assert "| DeiT-S | not compiled | not compiled | not compiled | not compiled | - / > 1800 |" in text
    assert "max(FLOPs / 197 TFLOP/s, bytes / 819 GB/s)" in text
    assert "| NextViT-S | not compiled |" in text and "compiled 2026-12-03" in text
    assert "2 config(s) without a recorded load" in text
    # Recorded loads: the range before the compiles and after them.
    table["configs"]["deit_s"]["measured"] = {"date": "2026-12-04", "load_average_start": [0.2, 0, 0],
                                              "load_average_end": [1.7, 0, 0]}
    table["configs"]["deit_s_hal"]["measured"] = {"date": "2026-12-04", "load_average_start": [0.4, 0, 0],
                                                  "load_average_end": [1.9, 0, 0]}
    text = render.render_aot(table)
    assert "1-min load average 0.2-0.4 before a compile" in text and "1.7-1.9 after one" in text
    assert "without" not in text


def test_aot_table_shows_a_hal_impl_as_its_own_row(render):
    info = {"compute_dtype": "bfloat16", "per_chip_batch": 128.0, "mesh": {"data": 4}}
    meta = {"topology": "v5e:2x2", "chips": 4, "device_kind": "TPU v5 lite", "hbm_gib": 16.0, "jax": "0.10.2",
            "info": info}
    pallas_cmd = "python benchmarks/aot_table.py run --impl pallas"
    table = {"command": pallas_cmd, "configs": {
        "deit_s": {**meta, "measured": {"date": "2026-12-04", "command": "python benchmarks/aot_table.py run"},
                   "programs": {"deploy_forward": _aot_program(2e12, 10e9, 2**30, 30)}},
        "deit_s_hal": {**meta, "programs": {"deploy_forward": _aot_program(1.6e12, 14e9, 2**30, 40)}},
        "deit_s_hal@pallas": {**meta, "measured": {"date": "2026-12-05", "command": pallas_cmd},
                              "programs": {"deploy_forward": _aot_program(1.6e12, 4e9, 2**29, 20)}}}}
    text = render.render_aot(table)
    assert "| DeiT-S | 2.000 -> 1.600 (0.80x) | 10.00 -> 14.00 (1.40x) |" in text
    # 4 GB take 4.9 ms, 1.6 TFLOP 8.1 ms: this one is compute-bound, 8.1 / 12.2 = 0.67.
    assert ("| DeiT-S, hal `impl=pallas` | 2.000 -> 1.600 (0.80x) | 10.00 -> 4.00 (0.40x) | 12.2 -> 8.1 (0.67x) "
            "| 1.00 -> 0.50 (0.50x) | 30 / 20 |") in text
    assert "PVTv2-b1, hal" not in text  # no pallas row where none was compiled
    # An ablation row (--model_flag): its own row, flags in the label, against the same baseline.
    table["configs"]["deit_s_hal@pallas,hal.cffn=False"] = {
        **meta, "programs": {"deploy_forward": _aot_program(1.5e12, 3e9, 2**29, 20)}}
    text = render.render_aot(table)
    assert "| DeiT-S, hal `impl=pallas`, `hal.cffn=False` | 2.000 -> 1.500 (0.75x) | 10.00 -> 3.00 (0.30x) |" in text
    assert text.index("hal `impl=pallas` |") < text.index("`hal.cffn=False`")
    assert text.count("`hal.cffn=False`") == 1  # no train-step row: only its deploy forward was compiled
    assert "Source: `python benchmarks/aot_table.py run --impl pallas`, `python benchmarks/aot_table.py run`" in text


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
    assert "not idle when the run started" in text  # no start load recorded: not claimed idle
    assert "CPU execution provider, default threads;" in text
    for threads, words in ((1, "1 intra-op thread;"), (2, "2 intra-op threads;")):
        assert words in render.render_deploy({**report, "config": {**report["config"], "threads": threads}})


def test_ort_threads_table_divides_one_thread_by_two(render):
    """The speed-up column is 1-thread time over 2-thread time; shapes joined with x; a
    constant B is marked as a weight; the session discipline and the command are quoted."""
    report = {"machine": {"cpu": "X", "cores": 2, "load_average_start": [0.2, 0.5, 0.9],
                          "load_average_end": [0.4, 0.5, 0.9]},
              "versions": {"onnxruntime": "1.32.0"}, "date": "2026-12-06 06:00:00 UTC", "git_commit": "abc",
              "command": "python benchmarks/ort_threads.py --turns 3",
              "config": {"turns": 3, "runs": 20, "threads": [1, 2]},
              "matmuls": [{"case": "heads", "a": [1, 3, 197, 64], "b": [1, 3, 64, 197], "b_constant": False,
                           "us": {"1": 150.0, "2": 100.0}},
                          {"case": "fc", "a": [1, 197, 1536], "b": [1536, 205], "b_constant": True,
                           "us": {"1": 1200.4, "2": 600.2}}]}
    text = render.render_ort_threads(report)
    assert "| heads | 1x3x197x64 | 1x3x64x197 | 150 | 100 | 1.50 |" in text
    assert "| fc | 1x197x1536 | 1536x205 (weight) | 1200 | 600 | 2.00 |" in text
    assert "median of 3 turns x 20 timed runs" in text and "one session alive at a time" in text
    assert "idle when the run started" in text and "0.2/0.5/0.9 at the start" in text
    assert "Command: `python benchmarks/ort_threads.py --turns 3`" in text


def test_host_wording_follows_the_load_at_the_start(render):
    assert render._host_use({"cores": 2, "load_average_start": [0.12, 1.4, 2.4]}) == "idle when the run started"
    assert render._host_use({"cores": 2, "load_average_start": [8.77, 10.8, 10.7]}) == "not idle when the run started"
    assert render._host_use({"cores": 2}) == "not idle when the run started"  # unknown: not claimed idle
    # The demo's shared-host caveats follow the same rule.
    busy = _demo_report(0.9428, 0.9259, 0.70, 0.74)
    quiet = {**busy, "machine": {**busy["machine"], "load_average_start": [0.2, 0.1, 0.1]}}
    assert "noisy and only indicative" in render.render_demo_runs(busy)
    assert "noisy" not in render.render_demo_runs(quiet)
    assert "faster on an idle host" in render.render_demo_train(busy)
    assert "idle when the run started" in render.render_demo_train(quiet)
    assert "faster on an idle host" not in render.render_demo_train(quiet)


def test_idle_rule_scales_with_the_cores(render):
    # A quarter of the cores: 0.5 on a 2-core host, 4 on the 16-core host of a lent GPU.
    assert render._idle({"cores": 16, "load_average_start": [1.5, 0.4, 0.1]})
    assert not render._idle({"cores": 16, "load_average_start": [4.5, 0.4, 0.1]})
    assert not render._idle({"cores": 2, "load_average_start": [0.6, 0.4, 0.1]})


def test_attention_core_gpu_computes_the_ratios_and_lists_refusals(render):
    def row(core, pas, ms=None, error=None):
        out = {"shape": "deit_s", "core": core, "pass": pas}
        out.update({"error": error} if error else {"ms": ms})
        return out

    rows = [row("mhsa_einsum", "fwd", 0.5), row("mhsa_dpa", "fwd", 0.4), row("mhsa_cudnn", "fwd", 0.2),
            row("hmhsa_plain", "fwd", 0.9), row("hmhsa_shifts", "fwd", 0.7), row("hmhsa_xla", "fwd", 0.6),
            row("hmhsa_triton", "fwd", 0.3), row("mhsa_einsum", "fwd+bwd", 1.0), row("mhsa_cudnn", "fwd+bwd", error="NotImplementedError: no"),
            row("hmhsa_plain", "fwd+bwd", 3.0), row("hmhsa_xla", "fwd+bwd", 1.2)]
    report = {"rows": rows, "machine": {"cpu": "x", "cores": 16, "load_average_start": [0.1, 0.1, 0.1]},
              "versions": {"jax": "0.11.2"}, "settings": {"batch": 128, "dtype": "bfloat16", "iters": 50,
                                                          "warmup": 5},
              "device": "NVIDIA H200", "platform": "gpu", "date": "2026-12-04", "git_commit": "abc",
              "command": "python benchmarks/attention_core_gpu.py"}
    text = render.render_attention_core_gpu(report)
    # 0.9 / 0.6 = 1.5, 0.6 / 0.5 = 1.2; 3.0 / 1.2 = 2.5, 1.2 / 1.0 = 1.2: computed, not typed.
    assert "| DeiT-S (N = Nk = 197) | fwd | 0.500 | 0.400 | 0.200 | 0.900 | 0.700 | 0.600 | 0.300 | 1.50x | 1.20x |" in text
    assert "| fwd+bwd | 1.000 | - | refused (NotImplementedError) | 3.000 | - | 1.200 | - | 2.50x | 1.20x |" in text
    assert "Refusals: `NotImplementedError: no`" in text and "idle when the run started" in text
