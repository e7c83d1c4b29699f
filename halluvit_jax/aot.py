r"""Compile a config for a TPU slice without the TPU: memory, FLOPs, HBM bytes, collectives.

    python -m halluvit_jax.aot --config configs/deit_s_hal.py --topology v5e:2x2 \
        --config.compute_dtype=bfloat16 --per_chip_batch 128 [--json out.json] [--debug]

The check to run before booking a slice (docs/aot.md). It builds, from the config, the same
jitted train step, mesh, parameter/optimizer shardings and batch placement that ``train.py``
builds (``halluvit_jax.train``), and the deploy forward (the folded cFFN model of a hal config,
the eval forward of a baseline), over the devices of a TPU topology description
(``jax.experimental.topologies``), and compiles both with XLA:TPU (libtpu, ``pip install
"jax[tpu]"``; no TPU needed). It prints, per chip: argument, output, temporary and peak memory
against the chip's HBM; FLOPs and HBM bytes (XLA's ``cost_analysis``); the collectives of one
step (count and bytes of each kind, from the optimized HLO); and the lowering/compile time.

Batch: the config's ``global_batch_size`` (the trainer's batch) unless ``--per_chip_batch N``
sets it to ``N x`` the data-parallel size (mesh ``data x fsdp``). The report states both.

A step whose peak memory exceeds the chip's HBM exits 1 with one ``error:`` line. libtpu's
start-up warnings about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES (meaningless without a TPU)
are dropped unless ``--debug``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

# Deviceless: the TPU devices come from a topology description; jax itself runs on the CPU
# (without this, libtpu tries to open a TPU at the first jax.devices()).
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Several deviceless compiles (tests, other users) may run at once; there is no TPU to share.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from halluvit_jax import cli  # noqa: E402
from halluvit_jax.data import pipeline  # noqa: E402
from halluvit_jax.data.ops import Preprocessor  # noqa: E402
from halluvit_jax.models import deploy_form  # noqa: E402
from halluvit_jax.train import sharding  # noqa: E402
from halluvit_jax.train.steps import compute_dtype, create_model  # noqa: E402
from halluvit_jax.train.trainer import build_train_program, model_error, resolve_steps  # noqa: E402

GiB = 2**30

#: HBM per chip, GiB. Source: Google Cloud TPU documentation, "TPU versions" pages
#: (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB HBM2, v5e 16 GiB HBM2,
#: v5p 95 GiB HBM2e, v6e (Trillium) 32 GiB. Keys: jax's ``device_kind``.
HBM_GIB_BY_KIND = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5e": 16.0, "TPU v5": 95.0, "TPU v5p": 95.0,
                   "TPU v6 lite": 32.0, "TPU v6e": 32.0}

#: Peak bf16 FLOP/s and HBM bytes/s per chip, from the same Cloud TPU pages' key chip
#: specifications: v4 275 TFLOPs and 1200 GBps, v5e 197 TFLOPs and 819 GBps, v5p 459 TFLOPs
#: and 2765 GBps, v6e 918 TFLOPs and 1640 GBps. Keys: jax's ``device_kind``.
PEAK_BY_KIND = {"TPU v4": (275e12, 1200e9), "TPU v5 lite": (197e12, 819e9), "TPU v5e": (197e12, 819e9),
                "TPU v5": (459e12, 2765e9), "TPU v5p": (459e12, 2765e9), "TPU v6 lite": (918e12, 1640e9),
                "TPU v6e": (918e12, 1640e9)}


def roofline(kind: str, flops: float, bytes_accessed: float) -> tuple[float, str] | None:
    """``(seconds, bound)``: the least time one chip of ``kind`` needs for ``flops`` at its peak
    bf16 rate and ``bytes_accessed`` at its HBM bandwidth, whichever is longer, and which
    (``"memory"`` or ``"compute"``); None for a chip not in `PEAK_BY_KIND`. A lower bound, not a
    prediction: it assumes perfect overlap and peak rates."""
    if kind not in PEAK_BY_KIND:
        return None
    peak_flops, bandwidth = PEAK_BY_KIND[kind]
    t_compute, t_memory = flops / peak_flops, bytes_accessed / bandwidth
    return (t_memory, "memory") if t_memory >= t_compute else (t_compute, "compute")


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

#: Lines libtpu prints when it initializes on a host without a TPU (harmless here).
_LIBTPU_NOISE = re.compile(
    r"TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|Logging before InitGoogle|Source Location Trace|"
    r"libtpu_init_utils|Failed to find host bounds|^\s*$")


# ---------------------------------------------------------------------------------------------
# Pure parts: the collectives of an HLO text, memory figures.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(pred|[a-z]+[0-9]+[a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?P<start>-start)?\(")


def _array_bytes(shape_text: str) -> list[float]:
    """Bytes of every array in an HLO shape (``f32[8,128]{1,0}`` or a tuple), layouts ignored."""
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
        out.append(size * math.prod(int(d) for d in dims.split(",") if d))
    return out


def parse_collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """``{kind: {"count", "bytes"}}`` of the collectives in an HLO module's text.

    Counts each collective instruction once (the async ``*-start``; ``*-done`` is skipped);
    a collective inside a loop body counts once, not per iteration. ``bytes``: the per-chip
    result of each (all-gather: the gathered array; reduce-scatter: this chip's shard;
    all-reduce: the reduced buffer, every operand of a combined all-reduce). For an async
    all-gather / collective-permute start, whose result tuple is (operands, outputs, contexts),
    the outputs.
    """
    out = {kind: {"count": 0, "bytes": 0.0} for kind in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        sizes = _array_bytes(m.group("shape"))
        if m.group("start") and m.group("op") in ("all-gather", "collective-permute", "all-to-all"):
            arrays = [s for s in sizes if s > 4]  # drop the u32[] / s32[] context scalars
            sizes = arrays[len(arrays) // 2:] if len(arrays) > 1 else arrays
        out[m.group("op")]["count"] += 1
        out[m.group("op")]["bytes"] += float(sum(sizes))
    return out


_FUSION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\sfusion\(")


def count_kernels(hlo_text: str) -> int:
    """The fusions of an optimized HLO module: each is one kernel the backend lowers, schedules
    and register-allocates, so the backend's share of the compile time grows with their number."""
    return sum(1 for line in hlo_text.splitlines() if _FUSION.match(line))


def hbm_gib(device: Any) -> tuple[float, str]:
    """(HBM per chip in GiB, where the figure comes from) for a TPU device."""
    try:  # a real, addressable device knows its memory
        stats = device.memory_stats() or {}
        if stats.get("bytes_limit"):
            return stats["bytes_limit"] / GiB, "device memory_stats"
    except Exception:  # noqa: BLE001 - topology devices are not addressable
        pass
    kind = getattr(device, "device_kind", "")
    if kind in HBM_GIB_BY_KIND:
        return HBM_GIB_BY_KIND[kind], f"{kind} datasheet (Cloud TPU docs)"
    raise cli.UserError(f"unknown HBM size of a {kind!r} chip; pass --hbm_gib")


def memory_figures(compiled: Any) -> dict[str, float]:
    """Per-chip bytes of ``compiled.memory_analysis()``: argument, output, alias, temp, peak."""
    m = compiled.memory_analysis()
    fig = {k: float(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    peak = float(getattr(m, "peak_memory_in_bytes", 0) or 0)
    fig["peak_source"] = "memory_analysis peak" if peak else "argument + output - alias + temp"
    fig["peak"] = peak or fig["argument"] + fig["output"] - fig["alias"] + fig["temp"]
    return fig


def cost_figures(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "transcendentals": float(cost.get("transcendentals", 0.0))}


# ---------------------------------------------------------------------------------------------
# libtpu's start-up noise.


@contextlib.contextmanager
def quiet_libtpu(debug: bool) -> Iterator[None]:
    """Captures what the C++ side writes to fd 2 and re-emits it without libtpu's known
    start-up warnings (everything is re-emitted with ``debug``)."""
    if debug:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines()
            keep = [ln for ln in lines if not _LIBTPU_NOISE.search(ln)]
            if keep:
                print("\n".join(keep), file=sys.stderr)


def topology_devices(name: str, debug: bool = False) -> list[Any]:
    """The devices of a TPU topology such as ``v5e:2x2`` (deviceless; needs libtpu)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise cli.UserError(
            "libtpu is not installed; install the TPU compiler with `pip install \"jax[tpu]==" + jax.__version__
            + "\"` (or the project's [tpu] extra) to compile for a TPU without one") from None

    try:
        with quiet_libtpu(debug):
            topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as err:  # noqa: BLE001 - libtpu: XlaRuntimeError / ValueError
        raise cli.UserError(f"cannot describe TPU topology {name!r}: {cli.clause(err)}; use e.g. v5e:2x2, "
                            "v4:2x2x1, v5p:2x2x1 or v6e:2x2") from None
    return list(topo.devices)


# ---------------------------------------------------------------------------------------------
# The programs: the trainer's train step and the deploy forward.


@dataclasses.dataclass
class Program:
    name: str  # 'train_step' / 'deploy_forward'
    jitted: Any
    args: tuple


def _num_classes(config: ml_collections.ConfigDict) -> tuple[int, str]:

    if (config.get("model") or {}).get("num_classes"):
        return int(config.model.num_classes), "config.model.num_classes"
    try:
        return int(pipeline.num_classes(config.input)), f"dataset {config.input.dataset}"
    except Exception:  # noqa: BLE001 - the dataset need not be prepared on this host
        known = {"imagenet2012": 1000, "imagenet": 1000, "cifar10": 10, "cifar100": 100, "stanford_dogs": 120,
                 "halluvit_digits": 10}
        n = known.get(str(config.input.dataset).split(":")[0], 1000)
        return n, f"{config.input.dataset} (not prepared here: assumed {n})"


def _image_spec(config: ml_collections.ConfigDict, train: bool) -> tuple[int, Any]:

    pre = Preprocessor(config.input.train_ops if train else config.input.eval_ops, config.input)
    return int(config.input.image_size), pre.dtype


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def build_programs(config: ml_collections.ConfigDict, devices: Sequence[Any], *, which: Sequence[str],
                   info: dict[str, Any]) -> list[Program]:
    """The trainer's jitted train step and the deploy forward over ``devices``, with abstract
    (``ShapeDtypeStruct``) sharded arguments. Fills ``info`` with the mesh, batch and model."""
    mesh = sharding.create_mesh(config.get("mesh", {}), devices=devices)
    batch_size = int(config.global_batch_size)
    dp = sharding.data_parallel_size(mesh)
    if batch_size % dp:
        raise cli.UserError(f"global_batch_size={batch_size} must be divisible by the data-parallel size {dp} "
                            "(mesh data x fsdp); change --per_chip_batch, --config.global_batch_size or --config.mesh")
    num_classes, classes_from = _num_classes(config)
    try:
        model = create_model(config, num_classes)
    except (ValueError, TypeError) as err:
        raise model_error(config, err) from None
    try:
        partitioner = sharding.partitioner_for(mesh, str(config.get("mesh", {}).get("partitioner", "auto")))
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
    info.update(mesh=dict(mesh.shape), partitioner=partitioner, global_batch=batch_size, data_parallel=dp,
                per_chip_batch=batch_size / dp, num_classes=num_classes, num_classes_from=classes_from,
                model=config.model_name, compute_dtype=str(config.get("compute_dtype", "float32")))
    repl = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    rules = [tuple(r) for r in config.get("sharding_rules", ())]
    fsdp_min_size = int(config.get("fsdp_min_size", 2**14))
    programs = []
    image_size = int(config.input.image_size)

    if "train" in which:  # the program train.py's train_and_evaluate runs
        total_steps = resolve_steps(config, "total", 1000, default=1000)
        program = build_train_program(config, model, mesh, input_cfg=config.input, num_classes=num_classes,
                                      batch_size=batch_size, total_steps=total_steps,
                                      warmup_steps=resolve_steps(config.optim, "warmup", 1000, default=0) or 0)
        size, dtype = _image_spec(config, train=True)
        batch = {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), dtype, sharding=batch_sh),
                 "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sh)}
        rng = jax.ShapeDtypeStruct(jax.eval_shape(lambda: jax.random.key(0)).shape, jax.random.key(0).dtype,
                                   sharding=repl)
        programs.append(Program("train_step", program.train_step, (program.abstract_state, batch, rng)))
        info["params"] = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(program.abstract_state.params))

    if "deploy" in which:  # the folded model (hal) / the eval forward (baseline), logits only
        deploy = deploy_form(model)
        variables = jax.eval_shape(
            lambda: deploy.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
        var_sh = sharding.infer_shardings(variables, mesh, rules=rules, fsdp_min_size=fsdp_min_size,
                                          logical_axes=sharding.logical_axes(deploy, image_size))

        def forward(variables, images):
            return deploy.apply(variables, images, train=False)

        fwd = jax.jit(sharding.with_axis_rules(mesh, forward), in_shardings=(var_sh, batch_sh), out_shardings=batch_sh)
        images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32, sharding=batch_sh)
        programs.append(Program("deploy_forward", fwd, (_abstract(variables, var_sh), images)))
        info["deploy_params"] = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(variables["params"]))
    return programs


class DoesNotFit(cli.UserError):
    """XLA:TPU refused the program: it needs more HBM than the chip has (completed by :func:`run`)."""

    def __init__(self, program: str, need_gib: float, have_gib: float, xla_message: str = ""):
        super().__init__(f"{program} needs {need_gib:.2f} GiB")
        self.program, self.need_gib, self.have_gib = program, need_gib, have_gib
        self.xla_message = xla_message


# libtpu's refusals: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for
# HLO temporaries (39.41G) exceeds available HBM (15.75G)." (libtpu 0.0.42.1) and "... Ran out of
# memory in memory space hbm. Used 20.25G of 15.48G hbm. Exceeded hbm capacity by 4.77G."
_OOM = re.compile(r"required for [^(]*\(([0-9.]+)([KMGT]?)i?B?\) exceeds available HBM \(([0-9.]+)([KMGT]?)i?B?\)"
                  r"|Used ([0-9.]+)([KMGT]?)i?B? of ([0-9.]+)([KMGT]?)i?B? hbm")


def _to_gib(value: str, unit: str) -> float:
    return float(value) * {"": 2**-30, "K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}[unit]


def compile_program(program: Program, debug: bool = False,
                    compiler_options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Lowers and compiles ``program``; returns (compiled, report)."""
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = program.jitted.lower(*program.args)
    t1, c1 = time.perf_counter(), time.process_time()
    try:
        with quiet_libtpu(debug):
            compiled = lowered.compile(compiler_options or None)
    except Exception as err:  # noqa: BLE001 - jax.errors.JaxRuntimeError from libtpu
        message = str(err)
        if "No such compile option" in message:
            raise cli.UsageError(f"--compiler_option: {cli.clause(message.splitlines()[0])}") from None
        oom = _OOM.search(message)
        if oom:
            g = [x for x in oom.groups() if x is not None]  # one of the two alternatives matched
            raise DoesNotFit(program.name, _to_gib(g[0], g[1]), _to_gib(g[2], g[3])) from None
        if "RESOURCE_EXHAUSTED" in message:
            raise DoesNotFit(program.name, float("nan"), float("nan"), cli.clause(message.splitlines()[0])) from None
        raise
    t2, c2 = time.perf_counter(), time.process_time()
    hlo = compiled.as_text()
    report = {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
              "lower_cpu_s": round(c1 - c0, 2), "compile_cpu_s": round(c2 - c1, 2),
              "kernels": count_kernels(hlo),
              "memory": memory_figures(compiled), "cost": cost_figures(compiled),
              "collectives": parse_collectives(hlo)}
    return compiled, report


# ---------------------------------------------------------------------------------------------
# Report.


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def format_report(result: dict[str, Any]) -> str:
    info = result["info"]
    lines = [
        f"{result['config']} on {result['topology']} ({result['chips']} x {result['device_kind']}, "
        f"{result['hbm_gib']:g} GiB HBM per chip: {result['hbm_source']})",
        f"model {info['model']} ({info.get('params', info.get('deploy_params', 0)) / 1e6:.2f}M params), "
        f"compute {info['compute_dtype']}, mesh {info['mesh']} ({info.get('partitioner', 'shardy')}), batch {info['global_batch']} global = "
        f"{info['per_chip_batch']:g} per data-parallel chip x {info['data_parallel']} "
        f"({result['batch_from']}), {info['num_classes']} classes",
    ]
    for name, rep in result["programs"].items():
        mem, cost = rep["memory"], rep["cost"]
        lines += [
            f"{name}: compiled in {rep['compile_s']:.1f} s (lowering {rep['lower_s']:.1f} s; CPU "
            f"{rep.get('lower_cpu_s', 0) + rep.get('compile_cpu_s', 0):.1f} s), {rep.get('kernels', '?')} kernels; "
            "per chip:",
            f"  memory   argument {_gib(mem['argument'])}, output {_gib(mem['output'])} (aliased "
            f"{_gib(mem['alias'])}), temporary {_gib(mem['temp'])}, peak {_gib(mem['peak'])} of "
            f"{result['hbm_gib']:g} GiB ({100 * mem['peak'] / (result['hbm_gib'] * GiB):.0f}%)",
            f"  compute  {cost['flops'] / 1e12:.3f} TFLOP, HBM bytes accessed {cost['bytes_accessed'] / 1e9:.2f} GB "
            f"(XLA cost_analysis)",
        ]
        bound = roofline(result["device_kind"], cost["flops"], cost["bytes_accessed"])
        if bound:
            lines.append(f"  roofline {1e3 * bound[0]:.1f} ms per step at peak rates ({bound[1]}-bound; "
                         "a lower bound)")
        coll = [f"{k} {v['count']} x ({v['bytes'] / 2**20:.1f} MiB)" for k, v in rep["collectives"].items()
                if v["count"]]
        lines.append("  collectives per step: " + (", ".join(coll) if coll else "none"))
    return "\n".join(lines)


def check_fits(result: dict[str, Any]) -> None:
    """Raises a one-line :class:`~halluvit_jax.cli.UserError` if a program needs more than HBM."""
    hbm = result["hbm_gib"]
    over = [(name, rep["memory"]["peak"] / GiB) for name, rep in result["programs"].items()
            if rep["memory"]["peak"] > hbm * GiB]
    if not over:
        return
    name, need = max(over, key=lambda x: x[1])
    raise cli.UserError(not_fit_message(result["config"], name, need, result["topology"], hbm))


def not_fit_message(config: str, program: str, need_gib: float, topology: str, hbm_gib: float,
                    usable: str = "") -> str:
    return (f"{config} needs {need_gib:.2f} GiB per chip ({program}), {topology} has {hbm_gib:g} GiB{usable}; "
            "lower the batch (--per_chip_batch / --config.global_batch_size), recompute activations "
            "(--config.model.remat=block), shard the state (--config.mesh.fsdp=-1), "
            "accumulate gradients (--config.optim.grad_accum_steps=2) or pick a chip with more HBM")


def run(config: ml_collections.ConfigDict, *, config_name: str, topology: str, which: Sequence[str] = ("train", "deploy"),
        per_chip_batch: int | None = None, hbm_override: float | None = None, debug: bool = False,
        dump_hlo: str | None = None, compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compiles ``config``'s programs for ``topology``; returns the report (a JSON-able dict)."""
    devices = topology_devices(topology, debug)
    config = ml_collections.ConfigDict(config.to_dict())  # a private copy
    batch_from = "config.global_batch_size"
    if per_chip_batch:
        mesh = sharding.create_mesh(config.get("mesh", {}), devices=devices)
        config.global_batch_size = int(per_chip_batch) * sharding.data_parallel_size(mesh)
        batch_from = f"--per_chip_batch {per_chip_batch}"
    hbm, source = hbm_gib(devices[0])
    if hbm_override:
        hbm, source = float(hbm_override), "--hbm_gib"
    info: dict[str, Any] = {}
    compute_dtype(config)  # an unknown dtype is one error line
    programs = build_programs(config, devices, which=which, info=info)
    result = {"config": config_name, "topology": topology, "chips": len(devices),
              "device_kind": devices[0].device_kind, "hbm_gib": hbm, "hbm_source": source,
              "batch_from": batch_from, "info": info, "jax": jax.__version__,
              "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
              "compiler_options": dict(compiler_options or {}), "programs": {}}
    for program in programs:
        print(f"compiling {program.name} ...", file=sys.stderr, flush=True)
        try:
            with sharding.use_partitioner(info["partitioner"]):  # the trainer's choice for this mesh
                compiled, result["programs"][program.name] = compile_program(program, debug, compiler_options)
        except DoesNotFit as err:
            if err.xla_message:  # a refusal whose figures were not recognized: XLA's own words
                raise cli.UserError(f"{config_name} does not fit {topology} ({hbm:g} GiB per chip): "
                                    f"{err.xla_message}; lower the batch, set --config.model.remat=block or "
                                    "--config.mesh.fsdp=-1") from None
            raise cli.UserError(not_fit_message(config_name, err.program, err.need_gib, topology, hbm,
                                                f" ({err.have_gib:.2f} GiB usable by XLA)")) from None
        if dump_hlo:
            os.makedirs(dump_hlo, exist_ok=True)
            with open(os.path.join(dump_hlo, f"{program.name}.hlo.txt"), "w") as f:
                f.write(compiled.as_text())
    return result


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: v}`` with booleans, integers and floats typed."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise cli.UsageError(f"--compiler_option {item!r}: expected KEY=VALUE")
        typed: Any = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(typed, str):
            for cast in (int, float):
                try:
                    typed = cast(value)
                    break
                except ValueError:
                    pass
        out[key] = typed
    return out


def _define(fv: flags.FlagValues, argv: list[str]) -> Any:
    ns = type("Flags", (), {})()
    ns.config = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:args]).",
                                                flag_values=fv, sys_argv=argv)
    ns.topology = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2.",
                                      flag_values=fv)
    ns.per_chip_batch = flags.DEFINE_integer("per_chip_batch", None, "Batch per data-parallel chip (sets "
                                             "global_batch_size = N x mesh data x fsdp).", flag_values=fv)
    ns.step = flags.DEFINE_enum("step", "both", ["both", "train", "deploy"], "Which program(s) to compile.",
                                flag_values=fv)
    ns.hbm_gib = flags.DEFINE_float("hbm_gib", None, "HBM per chip in GiB (default: the chip's).", flag_values=fv)
    ns.json = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.", flag_values=fv)
    ns.compiler_option = flags.DEFINE_multi_string(
        "compiler_option", [], "KEY=VALUE passed to XLA:TPU for this compile (a DebugOptions or libtpu flag, "
        "e.g. xla_jf_print_compilation_stats=true); repeatable.", flag_values=fv)
    ns.dump_hlo = flags.DEFINE_string("dump_hlo", None, "Write each program's optimized HLO text to this directory.",
                                      flag_values=fv)
    return ns


def main(argv: list[str], *, debug: bool = False) -> int:
    configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    handles = cli.parse_absl_flags(argv, _define, configs_dir=configs_dir, prog="python -m halluvit_jax.aot")
    if handles.config.value is None:
        raise cli.UsageError("--config is required, e.g. --config configs/deit_s_hal.py (see --help)")
    if "JAX_PLATFORMS" not in os.environ:  # before any backend starts: jax itself on the CPU
        jax.config.update("jax_platforms", "cpu")
    config_name = cli.config_path_arg(argv) or "config"
    which = ("train", "deploy") if handles.step.value == "both" else (handles.step.value,)
    result = run(handles.config.value, config_name=config_name, topology=handles.topology.value, which=which,
                 per_chip_batch=handles.per_chip_batch.value, hbm_override=handles.hbm_gib.value, debug=debug,
                 dump_hlo=handles.dump_hlo.value, compiler_options=parse_options(handles.compiler_option.value))
    print(format_report(result))
    if handles.json.value:
        os.makedirs(os.path.dirname(os.path.abspath(handles.json.value)), exist_ok=True)
        with open(handles.json.value, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
            f.write("\n")
    check_fits(result)
    return 0


def cli_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = cli.debug_requested(argv)
    return cli.run_main(functools.partial(main, debug=debug), argv)


if __name__ == "__main__":
    sys.exit(cli_main())
