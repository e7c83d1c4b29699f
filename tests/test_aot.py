"""``python -m halluvit_jax.aot``: deviceless XLA:TPU compiles of a config (docs/aot.md).

The pure parts (the collective parser, the memory figures, the does-not-fit line) run
everywhere; the compiles need libtpu (``pip install "jax[tpu]"``) and are skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from halluvit_jax import aot, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install \"jax[tpu]\"; CI's [tpu] extra installs it)")

# Lines of real XLA:TPU output (libtpu 0.0.42.1, optimized HLO), trimmed of backend_config.
HLO = """\
ENTRY %main.0_spmd (param.1: f32[256,256], param: f32[16,256]) -> f32[256,256] {
  %fusion = f32[256,256]{1,0:T(8,128)S(1)} fusion(%param, %copy-done), kind=kOutput, calls=%fused_computation.1
  %all-reduce = f32[256,256]{1,0:T(8,128)} all-reduce(%fusion), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, use_global_device_ids=true, to_apply=%add.clone
  %all-reduce.7 = (bf16[1024]{0:T(1024)}, f32[384,192]{1,0:T(8,128)}) all-reduce(%a, %b), channel_id=2, to_apply=%add.clone
  %all-reduce-start.2 = f32[192]{0:T(256)} all-reduce-start(%c), channel_id=3, to_apply=%add.clone
  %all-reduce-done.2 = f32[192]{0:T(256)} all-reduce-done(%all-reduce-start.2)
  %all-gather-start = (bf16[64,384]{1,0:T(8,128)(2,1)}, bf16[128,384]{1,0:T(8,128)(2,1)}) all-gather-start(%p), channel_id=4, dimensions={0}
  %all-gather-done = bf16[128,384]{1,0:T(8,128)(2,1)} all-gather-done(%all-gather-start)
  %reduce-scatter.1 = f32[96,384]{1,0:T(8,128)} reduce-scatter(%g), channel_id=5, dimensions={0}, to_apply=%add.clone
  %collective-permute-start = (f32[8,128]{1,0}, f32[8,128]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%x), source_target_pairs={{0,1},{1,0}}
  %collective-permute-done = f32[8,128]{1,0} collective-permute-done(%collective-permute-start)
  ROOT %tuple = (f32[256,256]{1,0}) tuple(%all-reduce)
}
"""


def test_parse_collectives_counts_and_bytes():
    got = aot.parse_collectives(HLO)
    assert got["all-reduce"] == {"count": 3, "bytes": 256 * 256 * 4 + (1024 * 2 + 384 * 192 * 4) + 192 * 4}
    assert got["all-gather"] == {"count": 1, "bytes": 128 * 384 * 2}  # the gathered output, not the operand
    assert got["reduce-scatter"] == {"count": 1, "bytes": 96 * 384 * 4}
    assert got["collective-permute"] == {"count": 1, "bytes": 8 * 128 * 4}  # contexts dropped
    assert got["all-to-all"] == {"count": 0, "bytes": 0.0}
    assert aot.parse_collectives("ENTRY %e { ROOT %f = f32[2]{0} fusion(%p), calls=%c }")["all-reduce"]["count"] == 0


def test_kernels_are_the_fusions_of_the_module():
    # The HLO above: one fusion; a fused computation's own instructions are not fusions.
    assert aot.count_kernels(HLO) == 1
    more = "%fused_computation.1 (p: f32[2]) -> f32[2] {\n  ROOT %m = f32[2]{0} multiply(%p, %p)\n}\n" + HLO.replace(
        "  ROOT %tuple", "  %fusion.2 = (f32[2]{0}, f32[]) fusion(%param), kind=kLoop, calls=%f2\n  ROOT %tuple")
    assert aot.count_kernels(more) == 2


def _result(peak_gib: float, hbm_gib: float) -> dict:
    mem = {"argument": 1.0, "output": 1.0, "alias": 1.0, "temp": 1.0, "peak": peak_gib * aot.GiB}
    return {"config": "configs/deit_s_hal.py", "topology": "v5e:2x2", "hbm_gib": hbm_gib,
            "programs": {"train_step": {"memory": mem}, "deploy_forward": {"memory": dict(mem, peak=1.0)}}}


def test_check_fits_one_line():
    aot.check_fits(_result(6.8, 16))  # fits: no error
    with pytest.raises(cli.UserError) as err:
        aot.check_fits(_result(20.25, 16))
    msg = cli.one_line(err.value)
    assert msg.startswith("configs/deit_s_hal.py needs 20.25 GiB per chip (train_step), v5e:2x2 has 16 GiB; ")
    assert "--config.model.remat=block" in msg and "\n" not in str(err.value)


def test_hbm_of_known_chips():
    class Dev:
        device_kind = "TPU v5 lite"

        def memory_stats(self):
            raise RuntimeError("MemoryStats is only supported for addressable PjRt devices.")

    assert aot.hbm_gib(Dev())[0] == 16.0
    Dev.device_kind = "TPU v4"
    assert aot.hbm_gib(Dev())[0] == 32.0
    Dev.device_kind = "TPU v99"
    with pytest.raises(cli.UserError, match="--hbm_gib"):
        aot.hbm_gib(Dev())


def _run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "halluvit_jax.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(HAS_LIBTPU, reason="checks the message shown where libtpu is absent")
def test_without_libtpu_one_error_line(capsys):
    assert aot.cli_main(["--config", os.path.join(ROOT, "configs", "demo.py"), "--step", "deploy"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: libtpu is not installed; install the TPU compiler with "
                                               '`pip install "jax[tpu]==')


# A small DeiT-T-hal: the real config's runlocal,data=demo form (2 blocks at 32 px) (the compile of the full train step
# takes minutes on a 2-core host; docs/aot.md). The shapes differ, the program is the same.
SMALL = ["--config", "configs/deit_t_hal.py:runlocal,data=demo", "--topology", "v5e:2x2", "--per_chip_batch", "4",
         "--config.compute_dtype=bfloat16"]


@needs_libtpu
@pytest.mark.slow
def test_deit_t_hal_train_step_compiles_for_v5e(tmp_path):
    out = tmp_path / "aot.json"
    proc = _run_cli(*SMALL, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "INVALID_ARGUMENT" not in proc.stderr and "TPU_WORKER_HOSTNAMES" not in proc.stderr
    rep = json.loads(out.read_text())
    assert rep["chips"] == 4 and rep["device_kind"] == "TPU v5 lite" and rep["hbm_gib"] == 16.0
    assert rep["info"]["global_batch"] == 16 and rep["info"]["mesh"] == {"data": 4, "fsdp": 1, "model": 1}
    train, fwd = rep["programs"]["train_step"], rep["programs"]["deploy_forward"]
    for prog in (train, fwd):
        assert prog["cost"]["flops"] > 0 and prog["cost"]["bytes_accessed"] > 0
        assert 0 < prog["memory"]["peak"] < rep["hbm_gib"] * aot.GiB
    # Data parallelism: the gradients are all-reduced over the 4 chips. With bf16 compute XLA
    # reduces them in bf16 (before the convert to the float32 parameters): 2 bytes per parameter,
    # plus the cFFN BatchNorm statistics. The forward needs no collective.
    n_params = rep["info"]["params"]
    assert train["collectives"]["all-reduce"]["count"] >= 1
    assert 1.9 * n_params <= train["collectives"]["all-reduce"]["bytes"] <= 4.5 * n_params
    assert fwd["collectives"]["all-reduce"]["count"] == 0
    assert train["cost"]["flops"] > 2 * fwd["cost"]["flops"]  # backward ~ 2x forward
    assert train["kernels"] > fwd["kernels"] > 0 and train["compile_cpu_s"] > 0 and train["lower_cpu_s"] > 0
    assert "train_step: compiled in" in proc.stdout and "collectives per step: all-reduce" in proc.stdout


@needs_libtpu
@pytest.mark.slow
def test_pallas_kernel_compiles_sharded_for_v5e(tmp_path):
    # impl="pallas" on 4 chips: XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be
    # automatically partitioned"), so the core runs per batch shard in a shard_map
    # (halluvit_jax.layers.axes.per_batch_shard). Both programs compile and hold the kernels.
    out, hlo = tmp_path / "aot.json", tmp_path / "hlo"
    proc = _run_cli(*SMALL, "--config.model.impl=pallas", "--json", str(out), "--dump_hlo", str(hlo))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["info"]["mesh"] == {"data": 4, "fsdp": 1, "model": 1} and rep["info"]["global_batch"] == 16
    train_hlo, fwd_hlo = ((hlo / f"{p}.hlo.txt").read_text() for p in ("train_step", "deploy_forward"))
    assert "hmhsa_fwd" in fwd_hlo and "hmhsa_bwd" not in fwd_hlo
    assert "hmhsa_fwd" in train_hlo and "hmhsa_bwd" in train_hlo
    # The kernels run on each chip's 4 images: no collective in the forward, gradients reduced.
    assert rep["programs"]["deploy_forward"]["collectives"]["all-reduce"]["count"] == 0
    assert rep["programs"]["train_step"]["collectives"]["all-reduce"]["count"] >= 1


@needs_libtpu
@pytest.mark.slow
def test_does_not_fit_exits_1_with_one_line():
    proc = _run_cli(*SMALL, "--step", "deploy", "--hbm_gib", "0.0001")
    assert proc.returncode == 1
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert err[0].startswith("error: configs/deit_t_hal.py:runlocal,data=demo needs ") and " per chip (deploy_forward), v5e:2x2 has " \
        "0.0001 GiB; lower the batch" in err[0]


@needs_libtpu
@pytest.mark.slow
def test_xla_out_of_memory_is_the_same_one_line():
    # 2**20 images of 32x32 per chip: XLA:TPU itself refuses the program (RESOURCE_EXHAUSTED).
    args = [a if a != "4" else str(2**20) for a in SMALL]
    proc = _run_cli(*args, "--step", "deploy")
    assert proc.returncode == 1, proc.stderr
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert " per chip (deploy_forward), v5e:2x2 has 16 GiB (" in err[0] and "GiB usable by XLA); lower" in err[0]
    need = float(err[0].split(" needs ")[1].split(" GiB")[0])
    assert need > 16


def test_compiler_options_are_typed():
    assert aot.parse_options(["a=true", "b=3", "c=0.5", "d=x"]) == {"a": True, "b": 3, "c": 0.5, "d": "x"}
    with pytest.raises(cli.UsageError):
        aot.parse_options(["novalue"])


@needs_libtpu
@pytest.mark.slow
def test_tensor_parallel_mesh_shows_its_collectives(tmp_path):
    # model=2: qkv/fc1 column-parallel, proj/fc2 row-parallel -> activations are reduced across
    # the 2 chips of each model group even in the forward; the batch is split over data=2.
    out = tmp_path / "aot.json"
    proc = _run_cli(*SMALL, "--step", "deploy", "--config.mesh.model=2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    assert rep["info"]["mesh"] == {"data": 2, "fsdp": 1, "model": 2} and rep["info"]["global_batch"] == 8
    coll = rep["programs"]["deploy_forward"]["collectives"]
    assert coll["all-reduce"]["count"] + coll["all-gather"]["count"] + coll["reduce-scatter"]["count"] > 0
    assert "collectives per step: " in proc.stdout and "collectives per step: none" not in proc.stdout


def test_table_merge_keeps_the_programs_a_new_run_lacks():
    spec = importlib.util.spec_from_file_location("aot_table", os.path.join(ROOT, "benchmarks", "aot_table.py"))
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    old = {"config": "configs/deit_s.py", "programs": {"deploy_forward": {"compile_s": 1.0}},
           "timed_out_s": {"train_step": 1800}}
    new = {"config": "configs/deit_s.py", "programs": {"train_step": {"compile_s": 2.0}}}
    merged = table.merge_report(old, new)
    assert merged["programs"] == {"deploy_forward": {"compile_s": 1.0}, "train_step": {"compile_s": 2.0}}
    assert "timed_out_s" not in merged  # the train step compiled this time


@pytest.mark.parametrize("message, need, have", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (39.41G) "
     "exceeds available HBM (15.75G).", 39.41, 15.75),  # libtpu 0.0.42.1
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.25G "
     "of 15.48G hbm. Exceeded hbm capacity by 4.77G.", 20.25, 15.48),
])
def test_xla_out_of_memory_messages_are_read(message, need, have):
    m = aot._OOM.search(message)
    groups = [x for x in m.groups() if x is not None]
    assert (aot._to_gib(*groups[:2]), aot._to_gib(*groups[2:])) == (need, have)


def test_roofline_takes_the_longer_of_compute_and_memory():
    """A v5e chip (197 bf16 TFLOP/s, 819 GB/s, the Cloud TPU datasheet): 4 TFLOP over 1 GB is
    compute-bound (20.3 ms against 1.2 ms), 1 TFLOP over 41 GB memory-bound (50.1 ms against
    5.1 ms); an unknown chip has none."""
    t, bound = aot.roofline("TPU v5 lite", 4e12, 1e9)
    assert bound == "compute" and abs(t - 4e12 / 197e12) < 1e-9
    t, bound = aot.roofline("TPU v5 lite", 1e12, 41e9)
    assert bound == "memory" and abs(t - 41e9 / 819e9) < 1e-9
    assert aot.roofline("TPU v99", 1e12, 1e9) is None
