"""Deploy benchmark: the FLOP saving of a folded hal model as wall-clock in ONNX Runtime.

For each baseline named by ``--models`` (e.g. ``deit_small``) the run exports, with the
package's deploy export (:mod:`halluvit_jax.convert.export`, jax2onnx, ``impl='accel'``: ``ONNX_IMPL``):

* ``base``: the baseline, in its deploy form too (NextViT's pre-BatchNorms merged, as timm's
  ``merge_pre_bn``; DeiT and PVTv2 have nothing to fold);
* ``hal``: its ``_hal`` twin in the folded deploy form (what ``convert deploy`` ships);
* ``timm``: when torch and timm are installed, timm's baseline exported with ``torch.onnx``
  (the TorchScript exporter, opset 17, dynamic batch), i.e. what timm users ship;

then exports them all and times each in one onnxruntime (CPU execution provider, ``--threads``
intra-op threads, 0 = onnxruntime's default) at each ``--batches`` size: median seconds per run
over the timed runs, on standard-normal NHWC (NCHW for timm) float32 input. The variants of a
model and batch are timed in turns (`_time_turns`): each pass runs every variant ``--warmup``
times untimed, then ``--iters`` times timed, back to back, and passes repeat until each variant
has ``--min-time`` timed seconds. The host's speed drifts within seconds; when each variant was
timed once per round, in one stretch of 3 runs, hal/base of DeiT-S at batch 1 ranged from 0.87
to 1.20 over the rounds of one run. ``--rounds N`` repeats all of it N times, each round running
every model and batch in turn.
``--optimize`` adds our two graphs after onnxruntime's transformer optimizer
(:func:`halluvit_jax.convert.export.optimize_onnx`) as variants ``base_opt`` / ``hal_opt``.

``--json`` writes the raw results with :mod:`run_info`'s header (machine, load, versions, commit,
command) and the load average before each round: per model and batch, the images/s of every
variant in every round, hal/base per round, the FLOP ideal ``MACs(base) / MACs(hal)``
(``halluvit_jax.complexity.count_macs``, per image, deploy form), each file's size and its
logit error. The medians, the share of the FLOP ideal (1.0 = the FLOP saving is realized in
full) and base/timm are computed from those by :func:`summary` (the printed table) and by
``benchmarks/render_docs.py`` (kind ``deploy``, docs/conversion.md).

Weights are random (the timing does not depend on them); with ``--check`` (default) each of our
ONNX files is compared with ``model.apply`` at batch 1 and 3 (max relative logit error).

Usage::

    python benchmarks/deploy.py --models deit_small,pvt_v2_b1,nextvit_small --batches 1,32 \
        --rounds 3 --json benchmarks/results/deploy.json
    python benchmarks/deploy.py --models deit_tiny --small --batches 1,4 --iters 3   # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_info  # noqa: E402

# --small: reduced models of each family (same structure, tiny widths/depths), their side.
SMALL = {
    "deit": (dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4), 32),
    "pvt_v2": (dict(depths=(1, 0, 0, 1), embed_dims=(16, 32, 40, 64),
                    mlp_ratios=(8.0, 8.0, 4.0, 4.0)), 64),
    "nextvit": (dict(depths=(1, 1, 5, 1), stem_chs=(16, 16, 24), conv_widths=(32, 48, 48, 96),
                     transformer_widths=(128, 128, 128), head_dim=16), 64),
}


def _family(name: str) -> str:
    for fam in SMALL:
        if name.startswith(fam):
            return fam
    raise SystemExit(f"error: no reduced config for {name!r} (families: {list(SMALL)})")


def _build(name: str, overrides: dict, size: int, seed: int = 0):
    """(model ready for export, variables): random weights, in the deploy form."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from halluvit_jax.models import create_model, deploy_form
    from halluvit_jax.reparam import reparameterize

    model = create_model(name, drop_path_rate=0.0, **overrides)
    variables = jax.device_get(jax.jit(model.init)(jax.random.key(seed),
                                                   jnp.zeros((1, size, size, 3))))
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map(  # away from init (zero heads, unit statistics)
        lambda a: (np.asarray(a) + 0.02 * rng.standard_normal(np.shape(a))).astype(np.float32)
        if np.ndim(a) else a, dict(variables))
    # Every model in its deploy form, as `convert deploy` ships it: the hal cFFNs folded, and
    # NextViT's pre-BatchNorms merged for the baseline as for the hal model.
    variables = reparameterize({k: v for k, v in variables.items() if k in ("params", "batch_stats")})
    return deploy_form(model), variables


def _macs(model, variables, size: int) -> int:
    import jax
    import numpy as np

    from halluvit_jax.complexity import count_macs

    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.float32),
                                      dict(variables))
    return int(count_macs(model, (1, size, size, 3), variables=abstract, train=False))


def _timm_onnx(timm_name: str, overrides: dict, size: int, num_classes: int, path: str) -> str:
    """Exports timm's model; returns '' or why it could not."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/timm_import.py
    from timm_import import import_timm

    try:
        timm = import_timm()  # also where the PyPI torchvision does not match torch
        import torch
    except ImportError as err:
        return f"torch/timm not installed ({err})"
    kwargs = dict(overrides)
    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs).eval()
    except TypeError as err:
        return f"timm {timm_name} does not take the reduced overrides ({err})"
    x = torch.randn(2, 3, size, size)
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "B"}, "logits": {0: "B"}})
        except Exception as err:  # noqa: BLE001 - report, keep benchmarking ours
            return f"torch.onnx.export failed: {type(err).__name__}: {str(err)[:200]}"
    return ""


def _time_turns(sessions: dict, inputs: dict, iters: int, warmup: int, min_time: float) -> dict:
    """Median seconds per run of each session in ``sessions`` (``{variant: session}``): passes
    over the variants, in turn, each pass running every variant ``warmup`` times untimed, then
    ``iters`` times timed, back to back (the steady state of one model served repeatedly), until
    each variant has ``min_time`` timed seconds (at most 100 passes). A variant's runs are thus
    spread over the whole measurement rather than one stretch of it: this host's speed drifts
    within seconds. Taking single runs in turn instead measured another regime (each run after
    another model's, its weights out of cache): every variant at batch 1 about 40% slower.
    ``inputs``: ``{variant: array}``."""
    feeds = {v: {sess.get_inputs()[0].name: inputs[v]} for v, sess in sessions.items()}
    times: dict = {v: [] for v in sessions}
    for _ in range(100):
        for v, sess in sessions.items():
            for _ in range(warmup):
                sess.run(None, feeds[v])
            for _ in range(iters):
                t = time.perf_counter()
                sess.run(None, feeds[v])
                times[v].append(time.perf_counter() - t)
        if min(sum(ts) for ts in times.values()) >= min_time:
            break
    return {v: statistics.median(ts) for v, ts in times.items()}


def _prepare(base: str, args, workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Exports ``base``, its hal twin (and timm's, the optimized graphs where asked); returns
    (the model's entry, {variant: onnxruntime session}). The sessions run without onnxruntime's
    memory arena: all of them stay open for the interleaved rounds, and with arenas each kept
    its batch-32 peak (15 sessions filled a 23 GiB host)."""
    from halluvit_jax.convert import export as ex
    from halluvit_jax.models import get_input_config

    if args.small:
        overrides, size = SMALL[_family(base)]
        overrides = dict(overrides, num_classes=args.num_classes)
    else:
        overrides, size = {"num_classes": args.num_classes}, int(args.resolution or
                                                                 get_input_config(base).input_size)
        if args.resolution and base.startswith("deit"):
            overrides["img_size"] = size
    entry: dict[str, Any] = {"model": base, "resolution": size, "variants": {}}
    sessions = {}
    for variant, name in (("base", base), ("hal", base + "_hal")):
        t = time.perf_counter()
        model, variables = _build(name, overrides, size)
        path = os.path.join(workdir, f"{name}.onnx")
        ex.write_onnx(path, model, variables, size)
        info = {"name": name, "export_s": round(time.perf_counter() - t, 1),
                "macs_per_image": _macs(model, variables, size),
                "onnx_bytes": os.path.getsize(path)}
        if args.check:
            info["max_rel_logit_error_vs_jax"] = ex.check_export("onnx", path, model, variables, size)
        sessions[variant] = ex.onnx_session(path, args.threads, arena=False)
        entry["variants"][variant] = info
        print(f"# exported {name}: {info}", flush=True)
        if args.optimize:
            opt_path = os.path.join(workdir, f"{name}.opt.onnx")
            t = time.perf_counter()
            fused = ex.optimize_onnx(path, opt_path)
            opt = {"name": name, "optimized": True, "export_s": round(time.perf_counter() - t, 1),
                   "macs_per_image": info["macs_per_image"], "onnx_bytes": os.path.getsize(opt_path),
                   "fused": fused}
            if args.check:
                opt["max_rel_logit_error_vs_jax"] = ex.check_export("onnx", opt_path, model, variables,
                                                                    size)
            sessions[variant + "_opt"] = ex.onnx_session(opt_path, args.threads, arena=False)
            entry["variants"][variant + "_opt"] = opt
            print(f"# optimized {name}: {opt}", flush=True)
    timm_name = get_input_config(base).timm_name
    if args.timm and timm_name:
        path = os.path.join(workdir, f"{base}.timm.onnx")
        why = _timm_onnx(timm_name, {k: v for k, v in overrides.items() if k != "num_classes"}
                         if args.small else {}, size, args.num_classes, path)
        if why:
            entry["timm_skipped"] = why
            print(f"# timm skipped: {why}", flush=True)
        else:
            sessions["timm"] = ex.onnx_session(path, args.threads, arena=False)
            entry["variants"]["timm"] = {"name": timm_name, "onnx_bytes": os.path.getsize(path)}
    return entry, sessions


def _report(args, prepared, batches, per_round, loads) -> dict[str, Any]:
    rows = []
    for entry, sessions in prepared:
        v = entry["variants"]
        for b in batches:
            ips = {name: per_round.get((entry["model"], b, name), []) for name in sessions}
            rows.append({
                "model": entry["model"], "resolution": entry["resolution"], "batch": b,
                "macs_per_image": {name: v[name]["macs_per_image"] for name in v
                                   if "macs_per_image" in v[name]},
                "flop_ideal": v["base"]["macs_per_image"] / v["hal"]["macs_per_image"],
                "images_per_s_rounds": ips,
                "hal_over_base_rounds": [h / s for h, s in zip(ips["hal"], ips["base"])],
                "max_rel_logit_error_vs_jax": {name: v[name]["max_rel_logit_error_vs_jax"] for name in v
                                               if "max_rel_logit_error_vs_jax" in v[name]},
                "onnx_bytes": {name: v[name]["onnx_bytes"] for name in v},
                **({"timm_skipped": entry["timm_skipped"]} if "timm_skipped" in entry else {}),
            })
    return {"config": vars(args), "rounds_completed": len(loads), "models": [e for e, _ in prepared], "rows": rows, "load_average_before_each_round": loads}


def run(args, on_round=None) -> dict[str, Any]:
    """Exports every model, then times them in ``args.rounds`` interleaved rounds (each round
    runs every model, batch and variant once, in turn); returns the raw per-round results
    (``on_round(report)`` sees them after each round)."""
    import numpy as np

    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    # The exported files (about 1.2 GB for the three full-size families) are only needed until
    # onnxruntime has loaded them into its sessions.
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as workdir:
        prepared = [_prepare(base, args, workdir)
                    for base in [m.strip() for m in args.models.split(",") if m.strip()]]
    loads: list = []
    per_round: dict = {}
    for r in range(args.rounds):
        loads.append(run_info.loadavg())
        for entry, sessions in prepared:
            size = entry["resolution"]
            for b in batches:
                x = rng.standard_normal((b, size, size, 3)).astype(np.float32)
                inputs = {v: np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if v == "timm" else x
                          for v in sessions}
                secs = _time_turns(sessions, inputs, args.iters, args.warmup, args.min_time)
                for variant, sec in secs.items():
                    per_round.setdefault((entry["model"], b, variant), []).append(b / sec)
        print(f"# round {r + 1} of {args.rounds} done", flush=True)
        if on_round is not None:
            on_round(_report(args, prepared, batches, per_round, loads))
    return _report(args, prepared, batches, per_round, loads)


def summary(row: dict[str, Any], graph: str = "") -> dict[str, float]:
    """Medians over the rounds of one row: images/s per variant, hal/base, its share of the FLOP
    ideal and base/timm, hal/timm (``graph='_opt'``: our optimized graphs against timm's)."""
    ips = row["images_per_s_rounds"]
    med = lambda values: statistics.median(values)  # noqa: E731
    base, hal = ips["base" + graph], ips["hal" + graph]
    out = {"base": med(base), "hal": med(hal), "hal_over_base": med([h / s for h, s in zip(hal, base)])}
    out["share_of_ideal"] = out["hal_over_base"] / row["flop_ideal"]
    if "timm" in ips:
        out["timm"] = med(ips["timm"])
        out["base_over_timm"] = med([s / t for s, t in zip(base, ips["timm"])])
        out["hal_over_timm"] = med([h / t for h, t in zip(hal, ips["timm"])])
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = ["| model | graph | batch | base img/s | hal img/s | hal/base | FLOP ideal | share of ideal "
             "| timm img/s | base/timm | hal/timm |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        for graph in ("", "_opt"):
            if "base" + graph not in row["images_per_s_rounds"]:
                continue
            r = summary(row, graph)
            timm = (f"{r['timm']:.1f} | {r['base_over_timm']:.2f} | {r['hal_over_timm']:.2f}"
                    if "timm" in r else "- | - | -")
            lines.append(f"| {row['model']} @{row['resolution']} | {'optimized' if graph else 'exported'} "
                         f"| {row['batch']} | {r['base']:.1f} | {r['hal']:.1f} | {r['hal_over_base']:.3f} "
                         f"| {row['flop_ideal']:.3f} | {r['share_of_ideal']:.3f} | {timm} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deit_small,pvt_v2_b1,nextvit_small",
                    help="comma-separated baselines; each is compared with its _hal twin")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0,
                    help="timed seconds each variant gets at least, per model, batch and round "
                         "(more passes of --warmup + --iters runs where runs are short)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--small", action="store_true", help="reduced models (smoke test)")
    ap.add_argument("--no-timm", dest="timm", action="store_false", help="skip timm's torch.onnx export")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the ONNX-vs-JAX logit check of our exports")
    ap.add_argument("--optimize", action="store_true",
                    help="also time our graphs after onnxruntime's transformer optimizer (own rows)")
    ap.add_argument("--json", default=None, help="also write the raw per-round report here")
    args = ap.parse_args(argv)
    head = run_info.header("deploy", __file__, argv, extra=("jax2onnx", "onnx", "onnxruntime", "torch", "timm"))

    def write(report):
        if args.json:
            machine = dict(head["machine"], load_average_end=run_info.loadavg(),
                           load_average_before_each_round=report["load_average_before_each_round"])
            run_info.write_json(args.json, {**head, **{k: v for k, v in report.items()
                                                       if k != "load_average_before_each_round"},
                                            "machine": machine})

    report = run(args, on_round=write)  # the JSON is rewritten after every round
    import onnxruntime

    print(f"\nonnxruntime {onnxruntime.__version__}, CPU, threads={args.threads or 'default'}, "
          f"median of passes of {args.iters} runs (>= {args.min_time:g} s) timed in turns, "
          f"median of {args.rounds} interleaved round(s)")
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
