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
                       "--warmup", "1", "--rounds", "2", "--num-classes", "7", "--optimize",
                       "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| deit_tiny @32 | exported | 3 |" in table and "| deit_tiny @32 | optimized | 3 |" in table
    report = json.loads(out.read_text())
    assert len(report["machine"]["load_average_before_each_round"]) == 2
    assert report["command"].startswith("python benchmarks/deploy.py --models deit_tiny")
    (entry,) = report["models"]
    base, hal = entry["variants"]["base"], entry["variants"]["hal"]
    assert base["max_rel_logit_error_vs_jax"] < 1e-4 and hal["max_rel_logit_error_vs_jax"] < 1e-4
    assert entry["variants"]["hal_opt"]["max_rel_logit_error_vs_jax"] < 1e-4
    assert [row["batch"] for row in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert row["flop_ideal"] == pytest.approx(base["macs_per_image"] / hal["macs_per_image"])
        assert row["flop_ideal"] > 1.0
        ips = row["images_per_s_rounds"]
        assert len(ips["hal"]) == 2 and len(ips["base_opt"]) == 2 and min(ips["base"] + ips["hal"]) > 0
        assert row["hal_over_base_rounds"] == pytest.approx([h / b for h, b in zip(ips["hal"], ips["base"])])
        assert row["onnx_bytes"]["hal"] > 0
        s = bench.summary(row)
        assert s["share_of_ideal"] == pytest.approx(s["hal_over_base"] / row["flop_ideal"])
        if _timm_importable():
            assert len(ips["timm"]) == 2 and s["base_over_timm"] > 0


def test_ort_threads_cases_are_the_matmuls_they_name(tmp_path):
    """Each single-MatMul graph of benchmarks/ort_threads.py computes numpy's matmul of its
    shapes on 1 and 2 threads (so the table times those products), and --json records every
    case with both thread counts."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from halluvit_jax.convert.export import onnx_session

    spec = importlib.util.spec_from_file_location("bench_ort_threads",
                                                  os.path.join(ROOT, "benchmarks", "ort_threads.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(3)
    for name, (a_shape, b_shape, const) in bench.MATMULS.items():
        model = bench._matmul_graph(a_shape, b_shape, const)
        a = rng.standard_normal(a_shape).astype(np.float32)
        feed = {"a": a}
        if const:  # the graph's own weight, read back from its initializer
            (init,) = onnx.load_from_string(model).graph.initializer
            b = numpy_helper.to_array(init)
            assert b.shape == b_shape, name
        else:
            b = feed["b"] = rng.standard_normal(b_shape).astype(np.float32)
        want = np.matmul(a.astype(np.float64), b.astype(np.float64))
        for threads in (1, 2):
            got = onnx_session(model, threads).run(None, feed)[0]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=name)
    out = tmp_path / "t.json"
    assert bench.main(["--turns", "1", "--runs", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["matmuls"]] == list(bench.MATMULS)
    assert all(r["us"]["1"] > 0 and r["us"]["2"] > 0 for r in report["matmuls"])
    assert report["command"].startswith("python benchmarks/ort_threads.py --turns 1")
