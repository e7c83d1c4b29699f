"""Model benchmark: inference and train-step throughput, memory, compile time and MFU.

One run measures, for each chosen model, form and variant, in a fresh subprocess each (so that
peak RSS and compile caches belong to one measurement):

* ``infer``: images/s of the jitted eval forward (``train=False``), batch ``--batch``;
* ``train``: images/s of the package's real train step (``halluvit_jax.train.steps.train_step``:
  forward, cross-entropy, backward, AdamW update; jit with the state donated);
* peak process RSS (``ru_maxrss``), XLA's memory analysis of the compiled executable
  (arguments + outputs + temporaries - aliased), compile time;
* FLOP/s from XLA's cost analysis of the compiled step and MFU = achieved FLOP/s / the float32
  matmul rate of this machine, measured by the same run (2048x2048 matmul in jax and, when
  installed, PyTorch; the faster of the two);
* with ``--vs-timm``: the same for timm's model under PyTorch (eager, ``torch.set_num_threads``),
  and our/timm ratios.

hal models are measured in their training form (cFFN branches) for ``train`` and in the folded
deploy form for ``infer`` (what is shipped); ``--forms`` overrides. The table ends with the hal
speedups over the baseline next to the ideal given by the FLOP reduction.

Variants: ``--impls`` lists the layer implementations to measure, each a row per model and
mode: every name in `halluvit_jax.layers.config.IMPLS` (``auto``, ``plain``, ``fused``, and
whatever is added there later); ``cudnn``, the MHSA baseline with
``jax.nn.dot_product_attention(implementation="cudnn")`` on the plain path (baseline models on a
CUDA platform only; a row skipped with its reason elsewhere); ``pallas`` is measured on TPU for
hal models only (skipped with its reason elsewhere: the kernel is TPU-only). ``--compare-root DIR`` also measures another checkout of the
project (e.g. ``git worktree add /tmp/before <commit>``) in the same rounds, as variant
``before``, so that a change is compared with what it replaced on the same host and hour.

Timing: the median over ``--iters`` timed iterations after ``--warmup`` untimed ones. On a
shared host whose speed drifts, ``--rounds N`` repeats the whole sequence N times (ours and timm
adjacent in each round) and reports the median of the N rounds for images/s and for each
within-round ratio (for an even N the mean of the middle two); the fastest round is kept apart
as ``images_per_s_best``, for tables whose column says "best".

``--json PATH`` writes the machine (CPU model, cores, load average before each round and at the
end, the accelerator when there is one), the versions of the libraries used, the exact command,
every round's raw rows (per-iteration times included) and the merged rows; it is rewritten after
every measured row, so that an interrupted run keeps what it measured (a round cut short is
marked ``round_in_progress``). benchmarks/render_docs.py builds
the tables of README.md and docs/benchmarks.md from the files in benchmarks/results/.

On a GPU (benchmarks/gpu.sh)::

    python benchmarks/models.py --dtype bfloat16 --models deit_small,deit_small_hal \
        --impls plain,accel,cudnn,pallas --batch 128 --json benchmarks/results/gpu.json

Usage::

    python benchmarks/models.py --models deit_small,deit_small_hal --vs-timm
    python benchmarks/models.py --models deit_small,deit_small_hal --resolution 384 --modes infer
    python benchmarks/models.py --models deit_tiny --batch 8 --iters 3 --json out.json   # quick
    python benchmarks/models.py --models deit_small --impls auto,plain --compare-root /tmp/before
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_info  # noqa: E402

# timm name of each baseline we can compare with (hal models compare with their baseline's).
TIMM_NAMES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "pvt_v2_b0": "pvt_v2_b0",
    "pvt_v2_b1": "pvt_v2_b1",
    "pvt_v2_b2": "pvt_v2_b2",
    "nextvit_small": "nextvit_small",
    "nextvit_base": "nextvit_base",
}


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _median_time(fn, iters: int, warmup: int) -> tuple[float, list[float]]:
    """The median of ``iters`` timed calls after ``warmup`` untimed ones, and every time in the
    order measured."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


# ---------------------------------------------------------------------------------------------
# Workers (each runs in its own process).


def _worker_matmul(args) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    platform_name = jax.default_backend()
    n = 2048 if platform_name == "cpu" else 8192
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    med, _ = _median_time(lambda: f(a, b).block_until_ready(), max(args.iters, 5), 2)
    out = {"kind": "matmul", "n": n, "dtype": args.dtype, "jax_gflops": 2 * n**3 / med / 1e9,
           "platform": platform_name, "device_kind": jax.devices()[0].device_kind,
           "device_count": jax.device_count()}
    if platform_name != "cpu" or args.dtype != "float32":
        # PyTorch's rate only where timm runs: on CPU, in float32 (its CPU bfloat16 matmul can
        # take minutes at this size).
        out["gflops"] = out["jax_gflops"]
        return out
    try:  # the same product in PyTorch, when installed: the machine's rate is the faster one
        import torch

        torch.set_num_threads(args.threads)
        ta, tb = (torch.from_numpy(np.asarray(t, np.float32)) for t in (a, b))
        med, _ = _median_time(lambda: ta @ tb, max(args.iters, 5), 2)
        out["torch_gflops"] = 2 * n**3 / med / 1e9
    except ImportError:
        pass
    out["gflops"] = max(out["jax_gflops"], out.get("torch_gflops", 0.0))
    return out


def _xla_memory(compiled) -> dict[str, float] | None:
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):  # not every backend has it
        return None
    if m is None:
        return None
    mib = 1024.0**2
    args = m.argument_size_in_bytes / mib
    out = m.output_size_in_bytes / mib
    temp = m.temp_size_in_bytes / mib
    alias = m.alias_size_in_bytes / mib
    return {"args_mib": args, "out_mib": out, "temp_mib": temp, "alias_mib": alias,
            "peak_mib": args + out + temp - alias}


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _worker_jax(args) -> dict[str, Any]:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from halluvit_jax.models import create_model
    from halluvit_jax.reparam import reparameterize
    from halluvit_jax.train import steps

    name, form, mode = args.model, args.form, args.mode
    b, res = args.batch, args.resolution
    dtype = {"float32": None, "bfloat16": jnp.bfloat16}[args.dtype]
    overrides: dict[str, Any] = {"img_size": res} if res != 224 else {}
    overrides.update(json.loads(args.overrides_json or "{}"))
    if args.variant == "cudnn":  # the MHSA baseline on cuDNN's fused attention kernel
        # The plain path's mhsa calls jax.nn.dot_product_attention (XLA's implementation by
        # default); this process only, every call asks for cuDNN's.
        jax.nn.dot_product_attention = functools.partial(jax.nn.dot_product_attention,
                                                         implementation="cudnn")
        overrides["impl"] = "plain"
    elif args.impl:  # "" for a checkout from before the impl switch
        overrides["impl"] = args.impl
    model = create_model(name, dtype=dtype, **overrides)
    rng = jax.random.key(0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, res, res, 3), np.float32))
    result: dict[str, Any] = {"framework": "jax", "model": name, "form": form, "mode": mode,
                              "variant": args.variant}

    if mode == "infer":
        variables = jax.jit(functools.partial(model.init, train=False))(rng, x[:1])
        if form == "deploy":
            variables = reparameterize(variables)
            model = create_model(name, dtype=dtype, deploy=True, **overrides)
        fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
        t = time.perf_counter()
        compiled = fn.lower(variables, x).compile()
        result["compile_s"] = time.perf_counter() - t
        run = lambda: compiled(variables, x).block_until_ready()
    else:
        tx = optax.adamw(1e-4, weight_decay=0.05)
        state = steps.create_train_state(rng, model=model, tx=tx, image_size=res, use_ema=False)
        labels = jnp.asarray(np.arange(b) % 1000, jnp.int32)
        batch = {"image": x, "label": labels}
        targets_fn = lambda r, im, lab: (im, jax.nn.one_hot(lab, 1000))
        step = jax.jit(
            functools.partial(
                steps.train_step, apply_fn=model.apply, tx=tx, targets_fn=targets_fn,
                learning_rate_fn=lambda s: 1e-4,
            ),
            donate_argnums=(0,),
        )
        t = time.perf_counter()
        compiled = step.lower(state, batch, rng).compile()
        result["compile_s"] = time.perf_counter() - t
        holder = [state]

        def run():
            holder[0], metrics = compiled(holder[0], batch, rng)
            metrics["loss"].block_until_ready()

    from halluvit_jax.complexity import count_macs

    macs_model = create_model(name, dtype=dtype, deploy=True, **overrides) if form == "deploy" else model
    result["gmacs_per_image"] = count_macs(macs_model, (1, res, res, 3), train=False) / 1e9
    result["rss_after_compile_mib"] = _peak_rss_mib()
    result["xla_memory"] = _xla_memory(compiled)
    result["xla_gflop_per_step"] = (_xla_flops(compiled) or float("nan")) / 1e9
    result["platform"] = jax.default_backend()
    if args.variant == "cudnn":  # the proof that cuDNN's kernel is what ran
        result["cudnn_fmha_calls"] = compiled.as_text().count("__cudnn$fmha")
    med, times = _median_time(run, args.iters, args.warmup)
    result.update(step_s=med, images_per_s=b / med, times=times, peak_rss_mib=_peak_rss_mib())
    return result


def _worker_timm(args) -> dict[str, Any]:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/timm_import.py
    from timm_import import import_timm

    timm = import_timm()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, res = args.batch, args.resolution
    kwargs = {"img_size": res} if res != 224 and "deit" in args.timm_name else {}
    model = timm.create_model(args.timm_name, pretrained=False, **kwargs)
    x = torch.randn(b, 3, res, res)
    result: dict[str, Any] = {"framework": "timm", "model": args.timm_name, "form": "train", "mode": args.mode}
    if args.mode == "infer":
        model.eval()

        def run():
            with torch.inference_mode():
                model(x)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        labels = torch.arange(b) % 1000
        loss_fn = torch.nn.CrossEntropyLoss()

        def run():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), labels)
            loss.backward()
            opt.step()
    med, times = _median_time(run, args.iters, args.warmup)
    result.update(step_s=med, images_per_s=b / med, times=times, peak_rss_mib=_peak_rss_mib())
    return result


# ---------------------------------------------------------------------------------------------
# Driver.


def _spawn(worker: str, args, **fields) -> dict[str, Any]:
    root = fields.pop("root", ROOT)  # the checkout whose halluvit_jax the worker imports
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", worker,
           "--batch", str(args.batch), "--resolution", str(args.resolution),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--dtype", args.dtype, "--overrides_json", json.dumps(_overrides(args.set))]
    for k, v in fields.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", ""))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    label = " ".join(f"{k}={v}" for k, v in fields.items()) or worker
    print(f"[bench] {worker}: {label} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        # The exception's own line (jax adds a note about its filtered frames after it).
        raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
        tail = raised[-1:] or lines[-1:] or ["(no output)"]
        print(f"[bench]   failed: {tail[0]}", file=sys.stderr)
        return {"error": tail[0], "framework": "timm" if worker == "timm" else "jax", **fields}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "images_per_s" in out:
        print(f"[bench]   {out['images_per_s']:.2f} img/s", file=sys.stderr, flush=True)
    return out


def _overrides(items: list[str]) -> dict[str, Any]:
    import ast

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


# Baseline-only variants that are not a layer `impl`, and impls announced before they exist.
EXTRA_VARIANTS = ("cudnn",)
PENDING_IMPLS: tuple[str, ...] = ()


def _known_impls() -> tuple[str, ...]:
    from halluvit_jax.layers.config import IMPLS

    return tuple(IMPLS)


def _variants(args) -> list[tuple[str, str, str]]:
    """``(label, impl, checkout root)`` of every jax variant to measure, in order."""
    out = [("before", "", os.path.abspath(args.compare_root))] if args.compare_root else []
    return out + [(impl, "plain" if impl == "cudnn" else impl, ROOT)
                  for impl in args.impls.split(",") if impl]


def _skip_reason(variant: str, name: str, platform_name: str) -> str:
    """Why ``variant`` of model ``name`` is not measured on ``platform_name`` ("" when it is)."""
    if variant in PENDING_IMPLS and variant not in _known_impls():
        return (f"impl {variant!r} does not exist yet (halluvit_jax.layers.config.IMPLS = "
                f"{_known_impls()})")
    if variant == "cudnn":
        if name.endswith("_hal"):
            return "cudnn: hMHSA has no cuDNN kernel (this row is the MHSA baseline's)"
        if platform_name not in ("gpu", "cuda"):
            return f"cudnn: needs a CUDA platform, this one is {platform_name!r}"
    if variant == "accel" and not name.endswith("_hal"):
        return "accel: only hMHSA has an accel core (a baseline runs its plain path)"
    if variant == "pallas":
        if not name.endswith("_hal"):
            return "pallas: only hMHSA has a Pallas kernel (a baseline runs its plain path)"
        if platform_name not in ("tpu", "gpu", "cuda"):
            return (f"pallas: the kernels are for TPU (Mosaic) and CUDA (Triton); on {platform_name!r} "
                    "impl='pallas' runs Pallas' interpreter, so its row would not measure them")
    return ""


def _baseline_of(name: str) -> str:
    return name.removesuffix("_hal")


def _format(rows: list[dict[str, Any]], matmul: float) -> str:
    head = (f"{'framework':9} {'model':22} {'variant':7} {'form':7} {'mode':6} {'img/s':>8} {'ratio':>7} "
            f"{'RSS MiB':>8} {'XLA MiB':>8} {'compile s':>9} {'GFLOP/s':>8} {'MFU':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r or "skipped" in r:
            what = f"ERROR {r['error']}" if "error" in r else f"SKIPPED {r['skipped']}"
            lines.append(f"{r.get('framework', '?'):9} {r.get('model', '?'):22} "
                         f"{r.get('variant', ''):7} {r.get('form', ''):7} {r.get('mode', ''):6} {what}")
            continue
        mem = r.get("xla_memory") or {}
        gf = r.get("achieved_gflops")
        lines.append(
            f"{r['framework']:9} {r['model']:22} {r.get('variant', ''):7} {r['form']:7} {r['mode']:6} "
            f"{r['images_per_s']:8.2f} "
            f"{r.get('vs_timm', float('nan')):7.2f} {r['peak_rss_mib']:8.0f} "
            f"{mem.get('peak_mib', float('nan')):8.0f} {r.get('compile_s', float('nan')):9.1f} "
            f"{(gf if gf is not None else float('nan')):8.1f} {r.get('mfu', float('nan')):6.1%}"
        )
    lines.append(f"(ratio: ours / timm images/s; MFU vs measured float32 matmul {matmul:.0f} GFLOP/s)")
    return "\n".join(lines)


def _step_gflop(r: dict[str, Any], batch: int) -> float:
    """GFLOP of one measured step: XLA's cost analysis, except on GPU (its cost analysis leaves
    out the cuBLAS/cuDNN custom calls, i.e. the matmuls) or where there is none: then our MAC
    count, x2, x3 for a train step."""
    gflop = r.get("xla_gflop_per_step")
    if gflop is None or math.isnan(gflop) or r.get("platform") == "gpu":
        gflop = 2 * r["gmacs_per_image"] * batch * (3 if r["mode"] == "train" else 1)
    return gflop


def _measure_round(args, names, modes, on_row=None):
    """One pass over every configuration: the matmul rate, then ours (and timm's) per mode and
    model. Returns ``(matmul, rows, timm_rows)``; ratios to timm are computed within the round.
    ``on_row(matmul, rows, timm_rows)`` runs after each measured row (the JSON is rewritten
    there, so a run cut short mid-round keeps the rows it finished)."""
    matmul = _spawn("matmul", args)
    if "error" in matmul:
        return matmul, [], {}
    rows: list[dict[str, Any]] = []
    timm_rows: dict[tuple[str, str], dict[str, Any]] = {}
    for mode in modes:
        for name in names:
            hal = name.endswith("_hal")
            if args.forms == "auto":
                forms = ["deploy" if (hal and mode == "infer") else "train"]
            else:
                forms = [f for f in args.forms.split(",") if f and (hal or f == "train")]
            for form in forms:
                for variant, impl, root in _variants(args):
                    reason = _skip_reason(variant, name, matmul.get("platform", "cpu"))
                    if reason:
                        print(f"[bench] skipped {name} {mode} {variant}: {reason}", file=sys.stderr)
                        rows.append({"framework": "jax", "model": name, "form": form, "mode": mode,
                                     "variant": variant, "skipped": reason})
                        continue
                    r = _spawn("jax", args, model=name, form=form, mode=mode, variant=variant,
                               impl=impl, root=root)
                    r.setdefault("variant", variant)
                    if "images_per_s" in r:
                        r["achieved_gflops"] = _step_gflop(r, args.batch) / r["step_s"]
                    rows.append(r)
                    if on_row:
                        on_row(matmul, rows, timm_rows)
            base = _baseline_of(name)
            if (args.vs_timm and base in TIMM_NAMES and (base, mode) not in timm_rows
                    and matmul.get("platform", "cpu") == "cpu"):
                t = _spawn("timm", args, timm_name=TIMM_NAMES[base], mode=mode)
                t["model_key"] = base
                timm_rows[(base, mode)] = t
    for r in rows:
        t = timm_rows.get((_baseline_of(r.get("model", "")), r.get("mode")))
        if t and "images_per_s" in t and "images_per_s" in r:
            r["vs_timm"] = r["images_per_s"] / t["images_per_s"]
            r["rss_vs_timm"] = r["peak_rss_mib"] / t["peak_rss_mib"]
    return matmul, rows, timm_rows


TIMED = ("images_per_s", "step_s", "peak_rss_mib", "rss_after_compile_mib", "compile_s")


def _merge_rounds(rows: list[dict[str, Any]], n_rounds: int) -> list[dict[str, Any]]:
    """One row per configuration (framework, model, variant, form, mode), in first-seen order.

    The load-dependent figures (images/s, RSS, compile time) are the median over the rounds
    (for an even count the mean of the middle two), each round's value kept under
    ``NAME_rounds`` and the fastest round's images/s under ``images_per_s_best``; the ratios to
    timm are the median of the within-round ratios (each taken where both ran close in time).
    What does not depend on load (XLA's memory and FLOPs, MACs) comes from the first round."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r.get("framework"), r.get("model"), r.get("variant"), r.get("form"), r.get("mode"))
        groups.setdefault(key, []).append(r)
    merged = []
    for group in groups.values():
        ok = [r for r in group if "images_per_s" in r]
        if not ok:  # skipped or failed in every round
            merged.append(dict(group[0]))
            continue
        row = dict(ok[0])
        row.pop("times", None)
        row["rounds_measured"] = len(ok)
        for key in TIMED:
            values = [r[key] for r in ok if key in r]
            if values:
                row[key] = statistics.median(values)
                row[key + "_rounds"] = values
        row["images_per_s_best"] = max(row["images_per_s_rounds"])
        for ratio in ("vs_timm", "rss_vs_timm"):
            values = [r[ratio] for r in ok if ratio in r]
            if values:
                row[ratio] = statistics.median(values)
                row[ratio + "_rounds"] = values
        merged.append(row)
    return merged


def _hal_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """hal model over its baseline (same mode) in ``rows``, next to the FLOP ideal: against the
    baseline of the same variant (for a variant the baseline has no kernel for, ``accel``, its
    ``plain`` row: what the baseline runs under that impl), and against the cuDNN MHSA baseline
    where that ran."""
    out = []
    by_key = {(r["model"], r["mode"], r.get("variant")): r for r in rows if "images_per_s" in r}
    for (name, mode, variant), r in by_key.items():
        if not name.endswith("_hal"):
            continue
        same = variant if (_baseline_of(name), mode, variant) in by_key else "plain"
        for base_variant in dict.fromkeys((same, "cudnn")):
            b = by_key.get((_baseline_of(name), mode, base_variant))
            if b and r.get("gmacs_per_image") and b.get("gmacs_per_image"):
                ideal = b["gmacs_per_image"] / r["gmacs_per_image"]
                actual = r["images_per_s"] / b["images_per_s"]
                out.append({"model": name, "mode": mode, "form": r["form"], "variant": variant,
                            "baseline_variant": base_variant, "speedup": actual,
                            "flop_ideal": ideal, "fraction_of_ideal": actual / ideal})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deit_small,deit_small_hal", help="comma-separated registry names")
    ap.add_argument("--modes", default="infer,train", help="infer, train or both")
    ap.add_argument("--forms", default="auto",
                    help="auto (baseline: train; hal: deploy for infer, train for train) or 'train,deploy'")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="model field override for our models, VALUE a Python literal (e.g. depth=2); "
                    "repeatable. timm models are never overridden (ratios then mean little)")
    ap.add_argument("--vs-timm", action="store_true", help="also run timm (PyTorch) and print ratios")
    ap.add_argument("--impls", default="auto",
                    help="comma-separated layer implementations to measure: auto, plain, fused")
    ap.add_argument("--compare-root", default="",
                    help="another checkout of the project, measured in the same rounds as 'before'")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every measurement N times, interleaved; report medians")
    ap.add_argument("--json", default="", help="write all results to this JSON file")
    # Internal: run one measurement and print its JSON.
    ap.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--form", default="train", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="infer", help=argparse.SUPPRESS)
    ap.add_argument("--timm_name", default="", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="", help=argparse.SUPPRESS)
    ap.add_argument("--overrides_json", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        fn = {"matmul": _worker_matmul, "jax": _worker_jax, "timm": _worker_timm}[args._worker]
        print(json.dumps(fn(args)))
        return 0

    sys.path.insert(0, ROOT)
    from halluvit_jax.models import list_models

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    known = set(list_models())
    for n in names:
        if n not in known:
            ap.error(f"unknown model {n!r}; see halluvit_jax.models.list_models()")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    unknown = [i for i in args.impls.split(",")
               if i and i not in _known_impls() + EXTRA_VARIANTS + PENDING_IMPLS]
    if unknown:
        ap.error(f"unknown impl(s) {unknown}; choose from "
                 f"{_known_impls() + EXTRA_VARIANTS + PENDING_IMPLS}")

    head = run_info.header("models", __file__, argv, extra=(
        "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu") + (("torch", "timm") if args.vs_timm else ()))
    machine = head["machine"]
    rounds, loads = [], []
    def write_partial(matmul, rows, timm_rows):
        if args.json and "error" not in matmul:
            run_info.write_json(args.json, _report(args, head, rounds + [(matmul, rows, timm_rows)],
                                                   loads, partial=True))

    for _ in range(args.rounds):
        loads.append(run_info.loadavg())
        rounds.append(_measure_round(args, names, modes, on_row=write_partial))
        if "error" in rounds[-1][0]:
            print(f"matmul measurement failed: {rounds[-1][0]['error']}", file=sys.stderr)
            return 1
        report = _report(args, head, rounds, loads)
        if args.json:  # the round complete (write_partial wrote its rows as they came)
            run_info.write_json(args.json, report)

    matmul, all_rows, speedups = report["matmul"], report["results"], report["hal_speedups"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores"
          + (f", {matmul['device_kind']}" if matmul.get("platform", "cpu") != "cpu" else "")
          + f"; batch {args.batch}, {args.resolution}px, {args.dtype}, median of {args.iters}"
          + (f", median of {args.rounds} rounds" if args.rounds > 1 else ""))
    print(f"{matmul['dtype']} {matmul['n']}^3 matmul: jax {matmul['jax_gflops']:.0f} GFLOP/s"
          + (f", torch {matmul['torch_gflops']:.0f}" if "torch_gflops" in matmul else ""))
    print(_format(all_rows, matmul["gflops"]))
    for s in speedups:
        vs = "" if s["baseline_variant"] == s["variant"] else f" ({s['baseline_variant']})"
        print(f"{s['model']} {s['mode']} ({s['form']}, {s['variant']}): {s['speedup']:.3f}x baseline{vs}, FLOP ideal "
              f"{s['flop_ideal']:.3f}x -> {s['fraction_of_ideal']:.2f} of ideal")
    for t in all_rows:
        if t.get("framework") == "timm" and "mfu" in t:
            print(f"{t['model_key']} {t['mode']}: timm runs at {t['mfu']:.1%} MFU; matching 1.1x timm "
                  f"needs {1.1 * t['mfu']:.1%}")
    return 0


def _report(args, head, rounds, loads, partial: bool = False) -> dict[str, Any]:
    """Everything measured so far: the raw rounds and the rows merged over them; ``partial``:
    the last round is still running (``rounds_completed`` does not count it)."""
    matmuls = [m for m, _, _ in rounds]
    matmul = dict(matmuls[0])
    for key in ("gflops", "jax_gflops", "torch_gflops"):
        values = [m[key] for m in matmuls if key in m]
        if values:
            matmul[key] = statistics.median(values)
            matmul[key + "_rounds"] = values
    rows = _merge_rounds([r for _, rs, _ in rounds for r in rs], len(rounds))
    timm_rows = _merge_rounds([t for _, _, ts in rounds for t in ts.values()], len(rounds))
    for r in rows:
        if "images_per_s" in r:
            r["achieved_gflops"] = _step_gflop(r, args.batch) * r["images_per_s"] / args.batch
            r["mfu"] = r["achieved_gflops"] / matmul["gflops"]
    # timm's MFU, from XLA's FLOP count of our baseline for the same work (same architecture,
    # batch and mode): what the ratio targets mean in matmul-rate terms.
    for t in timm_rows:
        ours = next((r for r in reversed(rows) if r.get("model") == t.get("model_key")
                     and r.get("mode") == t.get("mode") and r.get("form") == "train"
                     and "achieved_gflops" in r), None)
        if ours and "images_per_s" in t:
            t["achieved_gflops"] = ours["achieved_gflops"] * t["images_per_s"] / ours["images_per_s"]
            t["mfu"] = t["achieved_gflops"] / matmul["gflops"]

    # hal speedups against the FLOP ideal: taken within each round (hal and its baseline ran
    # minutes apart, not rounds apart), then the median over the rounds.
    per_round = [_hal_speedups([r for r in rs if "images_per_s" in r]) for _, rs, _ in rounds]
    speedups = []
    for s0 in per_round[0]:
        key = ("model", "mode", "form", "variant", "baseline_variant")
        values = [s["speedup"] for sp in per_round for s in sp
                  if all(s[k] == s0[k] for k in key)]
        actual = statistics.median(values)
        speedups.append({**s0, "speedup": actual, "fraction_of_ideal": actual / s0["flop_ideal"],
                         "speedup_rounds": values})

    return {
        **head,
        "machine": {**head["machine"], "platform": matmul.get("platform"),
                    "device_kind": matmul.get("device_kind"), "device_count": matmul.get("device_count"),
                    "load_average_before_each_round": loads, "load_average_end": run_info.loadavg()},
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "rounds_completed": len(rounds) - partial,
        **({"round_in_progress": True} if partial else {}),
        "matmul": matmul,
        "results": rows + timm_rows,
        "hal_speedups": speedups,
        "raw_rounds": [{"load_average_before": load, "matmul": m, "rows": rs, "timm": list(ts.values())}
                       for load, (m, rs, ts) in zip(loads, rounds)],
    }

if __name__ == "__main__":
    sys.exit(main())
