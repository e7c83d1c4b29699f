"""Smoke test of benchmarks/deploy.py: our ONNX exports (and timm's, when installed) are timed in
onnxruntime and the hal-vs-baseline speedup is set against the FLOP ideal. Speed is not asserted."""

import importlib.util
import json
import os

import pytest

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timm_importable() -> bool:
    """timm and torch import, as the benchmark imports them."""
    from timm_import import import_timm

    try:
        import_timm()
    except ImportError:
        return False
    return True


@pytest.mark.slow  # 35 s: the deploy benchmark end to end
def test_deploy_benchmark_runs_and_reports(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_deploy", os.path.join(ROOT, "benchmarks", "deploy.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--models", "deit_tiny", "--small", "--batches", "1,3", "--iters", "2",
                       "--warmup", "1", "--rounds", "2", "--num-classes", "7",
                       "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| deit_tiny @32 | 3 |" in table
    (entry,) = json.loads(out.read_text())["models"]
    base, hal = entry["variants"]["base"], entry["variants"]["hal"]
    assert base["max_rel_logit_error_vs_jax"] < 1e-4 and hal["max_rel_logit_error_vs_jax"] < 1e-4
    assert entry["flop_ideal"] == pytest.approx(base["macs_per_image"] / hal["macs_per_image"])
    assert entry["flop_ideal"] > 1.0
    for row in entry["batches"].values():
        assert len(row["images_per_s_rounds"]["hal"]) == 2 and row["base"] > 0 and row["hal"] > 0
        assert row["ratio_to_flop_ideal"] == pytest.approx(row["hal_speedup"] / entry["flop_ideal"])
        if _timm_importable():
            assert row["timm"] > 0 and row["base_over_timm"] == pytest.approx(row["base"] / row["timm"])
