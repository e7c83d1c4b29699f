r"""Run the paper's ablations on the embedded demo and collect top-1, params, FLOPs and CCS.

  python scripts/run_ablations.py --epochs 8 --seeds 0,1,2 --root /tmp/ablations \
      --output benchmarks/results/ablations.json
  python scripts/run_ablations.py --table   # the markdown tables of benchmarks/results/ablations.json

Every (setting, seed) trains with ``configs/ablations/demo.py`` into ``ROOT/SETTING_sSEED``;
results go to ``--output`` after each run (re-running skips finished runs, so an interrupted
grid resumes). Runs are ordered seed-major, so a partial grid has every setting at fewer seeds.
Params and MACs are for the deploy form (cFFN folded) and one image; CCS is on the validation
split (all 297 images). ``--table`` only prints the markdown tables of an existing JSON; the
committed ones in docs/ablations.md are rendered from benchmarks/results/ablations.json by
``python benchmarks/render_docs.py`` (kinds ``ablations``, ``ablation_directions`` and
``ablation_summary``, which call this module's ``summarize`` and ``direction_rows``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "configs", "ablations", "demo.py")


def _load_config(arg: str):
    from halluvit_jax.config_helpers import load_config

    return load_config(CONFIG, arg)


def _final_top1(workdir: str) -> float:
    top1 = None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "eval/top1" in rec:
                top1 = rec["eval/top1"]
    if top1 is None:
        raise RuntimeError(f"No eval/top1 in {workdir}/metrics.jsonl.")
    return float(top1)


def complexity_of(model, image_size: int) -> tuple[int, int]:
    """(params, MACs per image) of ``model`` in its deploy form."""
    import jax
    import jax.numpy as jnp

    from halluvit_jax.complexity import count_macs, count_params
    from halluvit_jax.models import deploy_form

    model = deploy_form(model)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return count_params(variables), count_macs(model, x.shape, variables=variables)


def run_one(ablation: str, seed: int, epochs: float, root: str) -> dict:
    import jax

    from halluvit_jax.analysis.ccs import model_ccs
    from halluvit_jax.data import pipeline
    from halluvit_jax.train import steps, trainer

    config = _load_config(f"ablation={ablation},seed={seed},epochs={epochs}")
    workdir = os.path.join(root, f"{ablation}_s{seed}")
    t0 = time.time()
    state = trainer.train_and_evaluate(config, workdir)
    train_s = time.time() - t0
    top1 = _final_top1(workdir)
    model = steps.create_model(config, 10)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    ccs = model_ccs(model, variables, pipeline.create_eval_iter(config.input, global_batch_size=100))
    params, macs = complexity_of(model, int(config.input.image_size))
    return {
        "ablation": ablation, "seed": seed, "epochs": epochs, "model_name": config.model_name,
        "model": config.model.to_dict(), "top1": top1, "params": params, "macs": macs,
        "ccs": ccs["ccs"], "ccs_blocks": [b["score"] for b in ccs["blocks"]],
        "train_seconds": round(train_s, 1), "workdir": workdir,
    }


def _save(results: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def summarize(results: dict) -> list[dict]:
    """One row per setting: mean/std of top-1 and CCS over seeds, params, MACs."""
    import numpy as np

    from halluvit_jax.analysis.ablations import ABLATIONS

    rows = []
    for ablation in ABLATIONS:
        runs = [r for r in results["runs"].values() if r["ablation"] == ablation]
        if not runs:
            continue
        top1 = np.array([r["top1"] for r in runs]) * 100
        ccs = np.array([r["ccs"] for r in runs])
        rows.append({
            "ablation": ablation, "seeds": len(runs), "top1_mean": float(top1.mean()),
            "top1_std": float(top1.std(ddof=1)) if len(runs) > 1 else float("nan"),
            "ccs_mean": float(ccs.mean()), "ccs_std": float(ccs.std(ddof=1)) if len(runs) > 1 else float("nan"),
            "params": runs[0]["params"], "macs": runs[0]["macs"],
        })
    return rows


def markdown_table(results: dict) -> str:
    lines = ["| setting | seeds | top-1 % (mean ± std) | params | MACs / image | CCS (mean ± std) |",
             "|---|---|---|---|---|---|"]
    for r in summarize(results):
        std = "" if math.isnan(r["top1_std"]) else f" ± {r['top1_std']:.2f}"
        cstd = "" if math.isnan(r["ccs_std"]) else f" ± {r['ccs_std']:.3f}"
        lines.append(f"| {r['ablation']} | {r['seeds']} | {r['top1_mean']:.2f}{std} | {r['params']:,} | "
                     f"{r['macs'] / 1e6:.3f} M | {r['ccs_mean']:.3f}{cstd} |")
    return "\n".join(lines)


# (higher, lower, metric, paper table, what the paper reports): the paper's direction of each effect.
PAPER_DIRECTIONS = [
    ("ihh_chh", "baseline", "top1", "1", "hMHSA + cFFN matches or beats the baseline (DeiT-T +0.7) at lower cost"),
    ("ihh_chh", "copy", "top1", "2", "copying the real heads costs about 0.5 top-1"),
    ("ihh_chh", "ihh", "top1", "2", "IHH alone is worse than IHH + CHH"),
    ("ihh_chh", "chh", "top1", "2", "CHH alone is worse than IHH + CHH"),
    ("ihh_chh", "chh_ihh", "top1", "3", "IHH before CHH beats CHH before IHH"),
    ("baseline", "ihh_chh", "ccs", "4", "hMHSA heads are less redundant (lower CCS) than MHSA heads"),
    ("ihh_chh", "plain_ffn", "top1", "5", "cFFN (t=2/3) beats a plain FFN with reduced m at equal cost (+0.3)"),
    ("ihh_chh", "r1", "top1", "5", "r=2 branches beat r=1"),
    ("ihh_chh", "r3", "top1", "5", "r=3 does not improve on r=2 (accuracy drops)"),
    ("ihh_chh", "w1", "top1", "6", "factorizing W2 beats factorizing W1 (+0.2)"),
    ("t3_4", "ihh_chh", "top1", "7", "a larger compact ratio t keeps more accuracy (t=3/4 >= 2/3)"),
    ("ihh_chh", "t1_2", "top1", "7", "t=2/3 >= t=1/2"),
]


def direction_rows(results: dict) -> list[dict]:
    """Each paper direction with our mean difference, its standard error and a verdict.

    Verdict: 'holds' when our difference has the paper's sign and exceeds 2 standard errors,
    'reversed' when the opposite sign exceeds 2 standard errors, else 'within noise (same sign)'
    or 'within noise (opposite sign)'.
    """
    import numpy as np

    def values(ablation, metric):
        scale = 100.0 if metric == "top1" else 1.0
        return np.array([r[metric] * scale for r in results["runs"].values() if r["ablation"] == ablation])

    rows = []
    for hi, lo, metric, table, text in PAPER_DIRECTIONS:
        a, b = values(hi, metric), values(lo, metric)
        if not len(a) or not len(b):
            continue
        diff = float(a.mean() - b.mean())
        se = float(np.sqrt((a.var(ddof=1) / len(a) if len(a) > 1 else 0.0)
                           + (b.var(ddof=1) / len(b) if len(b) > 1 else 0.0)))
        if min(len(a), len(b)) < 2:
            verdict = "1 seed: " + ("same sign" if diff > 0 else "opposite sign")
        elif se > 0 and abs(diff) > 2 * se:
            verdict = "holds" if diff > 0 else "reversed"
        else:
            verdict = "within noise (same sign)" if diff > 0 else "within noise (opposite sign)"
        rows.append({"higher": hi, "lower": lo, "metric": metric, "table": table, "paper": text,
                     "diff": diff, "se": se, "verdict": verdict, "n": (len(a), len(b))})
    return rows


def directions_table(results: dict) -> str:
    lines = ["| paper (table) | expected | ours: difference ± s.e. | at demo scale |", "|---|---|---|---|"]
    for r in direction_rows(results):
        unit = " pts" if r["metric"] == "top1" else ""
        fmt = ".2f" if r["metric"] == "top1" else ".3f"
        lines.append(f"| {r['paper']} ({r['table']}) | {r['metric']}: {r['higher']} > {r['lower']} | "
                     f"{r['diff']:+{fmt}} ± {r['se']:{fmt}}{unit} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from halluvit_jax.analysis.ablations import ABLATIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=10.0, help="epochs per run (same for all runs)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help="comma-separated settings")
    p.add_argument("--root", default="/tmp/halluvit_ablations", help="workdirs go here")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "ablations.json"), help="results JSON (resumed)")
    p.add_argument("--merge", action="append", default=[], metavar="JSON",
                   help="results of another worker (same epochs): merged into the table, their runs skipped")
    p.add_argument("--table", action="store_true", help="print the markdown table of --output and exit")
    args = p.parse_args(argv)

    results = {"epochs": args.epochs, "runs": {}}
    if os.path.exists(args.output):
        with open(args.output) as f:
            results = json.load(f)
    done_elsewhere = set()
    for other in args.merge:
        if not os.path.exists(other):
            print(f"note: {other} does not exist (yet); not merged", file=sys.stderr)
            continue
        with open(other) as f:
            extra = json.load(f)
        if float(extra.get("epochs", results.get("epochs", args.epochs))) != float(results.get("epochs", args.epochs)):
            raise SystemExit(f"{other} holds {extra['epochs']}-epoch runs, {args.output} does not; not merging.")
        done_elsewhere |= set(extra["runs"])
        if args.table:
            results["runs"] = {**extra["runs"], **results["runs"]}
    if args.table:
        print(markdown_table(results))
        print()
        print(directions_table(results))
        return 0
    if float(results.get("epochs", args.epochs)) != args.epochs:
        raise SystemExit(f"{args.output} holds {results['epochs']}-epoch runs; use --epochs "
                         f"{results['epochs']} or another --output.")
    ablations = [a for a in args.ablations.split(",") if a]
    unknown = set(ablations) - set(ABLATIONS)
    if unknown:
        raise SystemExit(f"Unknown ablation(s) {sorted(unknown)}; choose from {list(ABLATIONS)}.")
    seeds = [int(s) for s in args.seeds.split(",") if s]

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s] %(message)s",
                        stream=sys.stdout)
    logging.getLogger("absl").setLevel(logging.WARNING)
    import jax

    # Seeds of one setting compile the same programs: reuse them from a disk cache.
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.root, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    for seed in seeds:
        for ablation in ablations:
            key = f"{ablation}_s{seed}"
            if key in results["runs"] or key in done_elsewhere:
                continue
            t0 = time.time()
            try:
                results["runs"][key] = run_one(ablation, seed, args.epochs, args.root)
            except Exception as e:  # keep the grid going; the failure is recorded
                logging.getLogger("run_ablations").exception("Run %s failed", key)
                results.setdefault("failed", {})[key] = repr(e)
                _save(results, args.output)
                continue
            r = results["runs"][key]
            print(f"[ablations] {key}: top1 {r['top1']:.4f} ccs {r['ccs']:.3f} params {r['params']} "
                  f"macs {r['macs']} ({time.time() - t0:.0f}s)", flush=True)
            _save(results, args.output)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
