"""Smoke test of benchmarks/models.py: it runs end to end and reports consistent numbers.

Speed itself is never asserted here (timings belong to the benchmark's own output); this checks
that the script measures what it says: the FLOP count it divides by, the memory analysis, the
hal-vs-baseline FLOP ideal, and the JSON it writes.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``cmd`` in a session of its own: on a timeout the whole group is killed, the benchmark's
    worker subprocesses with it (``subprocess.run(timeout=...)`` kills only the direct child)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[1]} ran over {timeout:.0f} s; its stderr ends: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow  # 150 s on 2 busy cores: the benchmark script end to end
def test_model_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users run it
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "models.py"),
           "--models", "deit_tiny,deit_tiny_hal", "--set", "depth=1", "--set", "img_size=64",
           "--resolution", "64", "--batch", "2", "--iters", "2", "--warmup", "1",
           "--rounds", "2", "--json", str(out)]
    proc = _run(cmd, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["model"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(m, k) for m in ("deit_tiny", "deit_tiny_hal") for k in ("infer", "train")}
    assert rows[("deit_tiny_hal", "infer")]["form"] == "deploy"
    assert rows[("deit_tiny_hal", "train")]["form"] == "train"
    assert report["matmul"]["gflops"] > 0
    assert report["command"].startswith("python benchmarks/models.py --models deit_tiny,deit_tiny_hal")
    assert report["versions"]["jax"] and report["machine"]["cores"] >= 1
    assert len(report["machine"]["load_average_before_each_round"]) == 2
    assert len(report["raw_rounds"]) == 2 and report["rounds_completed"] == 2
    for r in rows.values():
        # Two interleaved rounds: the reported figure is their median (the mean of the two),
        # the faster one is kept apart as the best.
        assert len(r["images_per_s_rounds"]) == 2
        assert r["images_per_s"] == pytest.approx(sum(r["images_per_s_rounds"]) / 2)
        assert r["images_per_s_best"] == max(r["images_per_s_rounds"])
        assert r["images_per_s"] > 0 and r["peak_rss_mib"] > 0 and r["compile_s"] > 0
        assert r["xla_memory"]["peak_mib"] > 0
        # XLA's FLOP count of the forward matches 2 x our MAC count within 15% (XLA adds
        # softmax/norm/elementwise FLOPs); a train step costs about 3 forwards.
        fwd = 2 * r["gmacs_per_image"] * 2
        ratio = r["xla_gflop_per_step"] / fwd
        assert (1.0 <= ratio <= 1.15) if r["mode"] == "infer" else (2.5 <= ratio <= 4.0), (r["model"], ratio)
        assert r["mfu"] == pytest.approx(r["achieved_gflops"] / report["matmul"]["gflops"])
    (speed,) = [s for s in report["hal_speedups"] if s["mode"] == "infer"]
    deploy_macs = rows[("deit_tiny_hal", "infer")]["gmacs_per_image"]
    assert speed["flop_ideal"] == pytest.approx(rows[("deit_tiny", "infer")]["gmacs_per_image"] / deploy_macs)
    assert speed["flop_ideal"] > 1.0
    # The reported speedup is the median of the per-round ones (the mean of two).
    assert len(speed["speedup_rounds"]) == 2
    assert speed["speedup"] == pytest.approx(sum(speed["speedup_rounds"]) / 2)
    assert "img/s" in proc.stdout and "of ideal" in proc.stdout


@pytest.mark.slow  # ~30 s: the matmul worker and one tiny model's row
def test_a_run_stopped_mid_round_keeps_the_rows_it_finished(tmp_path):
    """A device session's time can run out inside the only round: the JSON is rewritten after
    every row, marked ``round_in_progress``, so the rows measured before the kill survive."""
    import time

    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "models.py"),
           "--models", "deit_tiny,deit_tiny_hal", "--modes", "infer", "--set", "depth=1",
           "--set", "img_size=32", "--resolution", "32", "--batch", "2", "--iters", "1",
           "--warmup", "0", "--rounds", "1", "--json", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    deadline, report = time.monotonic() + 300, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists():
                report = json.loads(out.read_text())
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # stopped while the hal model's row runs
        proc.wait()
    assert report is not None, proc.stderr.read()[-2000:]
    assert report["round_in_progress"] is True and report["rounds_completed"] == 0
    (row,) = report["results"]  # the baseline's row, the first measured
    assert row["model"] == "deit_tiny" and row["images_per_s"] > 0
    assert len(report["raw_rounds"]) == 1 and report["matmul"]["gflops"] > 0
    assert json.loads(out.read_text())["results"][0] == row  # the kill left the file whole


@pytest.mark.slow  # ~90 s on 2 busy cores: four tiny models compiled in bfloat16
def test_gpu_benchmark_command_runs_on_cpu_with_its_rows(tmp_path):
    """benchmarks/gpu.sh, the one command a GPU session runs, with a tiny setting on this CPU:
    bf16 rows for plain, accel, the cuDNN MHSA baseline and pallas; on CPU the cuDNN rows are
    skipped for the platform, on every platform for hal models; the pallas rows on CPU (the
    kernels run interpreted there) and for baselines (no kernel); the accel rows for baselines (no accel
    core), while the hal model's accel row is measured."""
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHON"] = sys.executable  # this interpreter, whether or not its venv is on PATH
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), str(out),
           "--models", "deit_tiny,deit_tiny_hal", "--set", "depth=1", "--set", "img_size=32",
           "--resolution", "32", "--batch", "2", "--iters", "1", "--warmup", "0", "--rounds", "1"]
    proc = _run(cmd, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["dtype"] == "bfloat16" and report["matmul"]["dtype"] == "bfloat16"
    rows = {(r["model"], r["mode"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {(m, k, v) for m in ("deit_tiny", "deit_tiny_hal") for k in ("infer", "train")
                         for v in ("plain", "accel", "cudnn", "pallas")}
    for (model, mode, variant), r in rows.items():
        if variant == "plain" or (variant == "accel" and model.endswith("_hal")):
            assert r["images_per_s"] > 0 and "skipped" not in r, r
        elif variant == "accel":
            assert "only hMHSA has an accel core" in r["skipped"]
        elif variant == "pallas" and model.endswith("_hal"):
            assert "runs Pallas' interpreter" in r["skipped"]
        elif variant == "pallas":
            assert "only hMHSA has a Pallas kernel" in r["skipped"]
        elif model.endswith("_hal"):
            assert "hMHSA has no cuDNN kernel" in r["skipped"]
        else:
            assert "needs a CUDA platform, this one is 'cpu'" in r["skipped"]
    assert "SKIPPED" in proc.stdout
    # The hal model's accel row is compared with the baseline's plain row (a baseline has no
    # accel core, so that is what it runs under impl="accel"), and its plain row with plain.
    speeds = {(s["mode"], s["variant"], s["baseline_variant"]): s for s in report["hal_speedups"]}
    assert set(speeds) == {(m, v, "plain") for m in ("infer", "train") for v in ("plain", "accel")}
    for (mode, variant, _), s in speeds.items():
        want = rows[("deit_tiny_hal", mode, variant)]["images_per_s"] / rows[("deit_tiny", mode, "plain")]["images_per_s"]
        assert s["speedup"] == pytest.approx(want)


def test_input_pipeline_benchmark_runs_and_pairs_chains_with_tf_data(tmp_path):
    """benchmarks/input_pipeline.py prepares its real-JPEG dataset, times every chain and
    compares each train chain with the tf.data chain doing the same work (uint8 output is
    compared with tf.data without normalization, float output with normalization)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import input_pipeline as bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "pipeline.json"
    results = bench.main(["--images", "20", "--reps", "1", "--batches", "2", "--batch_size", "4",
                          "--threads", "1", "--workdir", str(tmp_path), "--json", str(out)])
    for name in bench.CHAINS:
        assert results[name] and all(v > 0 for v in results[name].values()), name
    report = json.loads(out.read_text())
    assert report["command"].startswith("python benchmarks/input_pipeline.py --images 20")
    assert report["versions"]["jax"] and report["machine"]["load_average_start"]
    for name in bench.CHAINS:  # every repetition is kept, and the median is of them
        for backend, reps in report["cpu_ms_per_image_reps"][name].items():
            assert len(reps) == 1 and report["cpu_ms_per_image_median"][name][backend] == reps[0]
    assert set(report["full_pipeline"]) >= {"eval"}
    ref = bench._tf_reference
    assert ref("train: rrc|flip|normalize").endswith("|flip|normalize")
    assert ref("train: rrc|flip|normalize(on_device=1)") == "tf.data: decode_and_crop|bilinear|flip"
    assert ref("train: rrc|flip|randaug|normalize(on_device=1)") is None
    assert ref("eval: resize_crop|normalize") is None
    assert set(filter(None, map(ref, bench.CHAINS))) <= set(bench.TF_CHAINS)


@pytest.mark.slow  # ~60 s: a model exported for CUDA and three kernels compiled to cubins twice
def test_triton_kernels_compile_for_a100_and_h100(tmp_path, monkeypatch, capsys):
    """benchmarks/triton_compile.py on DeiT-T-hal (4 heads of 48 channels: masked tiles of 64):
    every Triton kernel of its ``impl='pallas'`` train step and deploy forward, read back from the
    CUDA export and compiled by the ``triton`` package to sm_80 and sm_90 cubins, fits the SM's
    shared memory; the JSON has one row per distinct kernel and target, and renders."""
    pytest.importorskip("triton", reason="triton absent: the test extra installs it on Linux x86-64")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import render_docs
        import triton_compile as bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "triton.json"
    assert bench.main(["--models", "deit_tiny_hal", "--batch", "2", "--capabilities", "80,90",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    kernels = ["hmhsa_fwd_triton", "hmhsa_dq_triton", "hmhsa_dkv_triton"]
    assert [(r["kernel"], r["capability"]) for r in rows] == [(k, c) for k in kernels for c in (80, 90)]
    # 12 blocks: the forward runs twice per block (train step, deploy forward), dq and dk/dv once.
    assert [r["calls"] for r in rows] == [24, 24, 12, 12, 12, 12]
    for r in rows:
        limit = report["shared_limit_bytes"][str(r["capability"])]
        assert r["fits"] and 0 < r["shared_bytes"] <= limit, r
        assert 0 < r["registers"] <= 255, r
    assert rows[0]["grid"][0] == 2  # one program row per image
    table = render_docs.render_triton_compile(report)
    assert "| DeiT-T-hal | `hmhsa_dq_triton` |" in table and "sm_80 163 KiB" in table
    # A kernel over the SM's limit is an error (exit 1) naming the kernel and the target.
    monkeypatch.setitem(bench.SHARED_LIMIT, 90, rows[1]["shared_bytes"] - 1)
    assert bench.main(["--models", "deit_tiny_hal", "--batch", "2", "--capabilities", "90"]) == 1
    assert "deit_tiny_hal/hmhsa_fwd_triton on sm_90" in capsys.readouterr().err
