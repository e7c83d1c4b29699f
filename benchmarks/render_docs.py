"""Render the figures of README.md and docs/*.md from the committed benchmark JSON.

Every figure the docs quote from a benchmark lies between two marker comments::

    <!-- render:KIND benchmarks/results/FILE.json -->
    ...generated text...
    <!-- /render -->

and this script rewrites what is between them from ``FILE.json`` (written by the benchmark's
``--json``), so that every median, ratio and fraction in the docs is computed by code from the
raw results. KIND is one of:

- ``machine``: the host, its load, the library versions, the date, the commit and the command;
- ``models``: per model and mode, images/s (median of the rounds, every round in brackets),
  timm's, the ratio, peak RSS, XLA's memory analysis and MFU (benchmarks/models.py);
- ``speedups``: hal over its baseline in each round, their median, the FLOP ideal and the
  fraction of it reached (benchmarks/models.py);
- ``complexity``: parameters and MACs of each baseline and its hal twin in deploy form, and the
  change (the list ``python -m halluvit_jax.complexity --json`` prints);
- ``onnx_ops``: the op histogram of each model's ONNX export before and after the graph passes,
  with the node totals and onnxruntime's logit error (benchmarks/onnx_ops.py);
- ``remat``: per remat setting, the activations kept for the backward pass and XLA's peak, with
  their ratios to ``none`` (benchmarks/remat_memory.py);
- ``complexity_full``, ``complexity_384``, ``complexity_paper``: docs/complexity.md's table of
  both forms, the differences from the published totals and the paper's reductions (quoted in
  this file), and docs/design.md's check (``python -m halluvit_jax.complexity --json``);
- ``ablations``, ``ablation_directions``, ``ablation_summary``: docs/ablations.md's grid, the
  paper's directions with our differences, and the summary's percentages and counts
  (scripts/run_ablations.py's ``summarize`` / ``direction_rows`` on benchmarks/results/ablations.json);
- ``parity``: each timm comparison of tests/test_convert_timm.py, its largest difference and the
  tolerance the test asserts (benchmarks/parity.py);
- ``input_pipeline``, ``input_pipeline_target``, ``fast_decode``: the CPU-ms per image of each
  preprocessing chain and decoder back-end, tf.data's chains and the ratios to them, the grain
  pipeline's img/s, the verdict on the tf.data target, and the ``fast`` JPEG decoding's error and
  saving (benchmarks/input_pipeline.py, docs/data.md);
- ``aot``: base vs hal per family, deploy forward and train step: TFLOPs, HBM bytes, peak
  memory and their ratios, and the compile time, by XLA:TPU's estimate (benchmarks/aot_table.py);
- ``aot_finite``: the train step with the NaN guard per state leaf and from the step's norms:
  kernels, CPU and wall seconds, HBM bytes and the after/before ratios (benchmarks/aot_finite_check.py);
- ``deploy``: onnxruntime images/s of each baseline, its hal twin and timm's torch.onnx graph,
  hal/base against the FLOP ideal, base/timm, logit errors and file sizes (benchmarks/deploy.py).

    python benchmarks/render_docs.py           # rewrite the tables in place
    python benchmarks/render_docs.py --check   # exit 1 when a committed table differs

tests/test_render_docs.py runs ``--check``.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import os
import re
import statistics
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docs(root: str = ROOT) -> tuple[str, ...]:
    """README.md and every page under docs/: any of them may hold a marked block."""
    pages = sorted(f for f in os.listdir(os.path.join(root, "docs")) if f.endswith(".md"))
    return ("README.md", *(f"docs/{f}" for f in pages))


DOCS = _docs()
MARKER = re.compile(r"(<!-- render:(\w+) (\S+) -->\n)(.*?)(<!-- /render -->)", re.S)

NAMES = {"deit_tiny": "DeiT-T", "deit_small": "DeiT-S", "deit_base": "DeiT-B",
         "pvt_v2_b0": "PVTv2-b0", "pvt_v2_b1": "PVTv2-b1", "pvt_v2_b2": "PVTv2-b2",
         "nextvit_small": "NextViT-S", "nextvit_base": "NextViT-B"}


def display_name(name: str, form: str = "", mode: str = "") -> str:
    base = name.removesuffix("_hal")
    out = NAMES.get(base, base) + ("-hal" if name.endswith("_hal") else "")
    if name.endswith("_hal") and form:
        out += " (deploy)" if form == "deploy" else " (training form)"
    return out


def _f(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def _rounds(values: list[float], digits: int = 2) -> str:
    return ", ".join(_f(v, digits) for v in values)


def _load_avg(load, missing: str = "not recorded") -> str:
    """A recorded 1/5/15-minute load average as ``a/b/c``, or ``missing``."""
    return "/".join(f"{x:.1f}" for x in load) if load else missing


def _loads(report: dict[str, Any]) -> str:
    """The load averages (1, 5, 15 min) recorded at the start (which `_host_use` reads), before
    each round and at the end."""
    m = report["machine"]
    start = _load_avg(m.get("load_average_start"))
    before = [_load_avg(load) for load in m.get("load_average_before_each_round", []) if load]
    end = _load_avg(m.get("load_average_end"))
    return f"{start} at the start, {', '.join(before) or 'not recorded'} before the rounds, {end} at the end"


def render_machine(report: dict[str, Any]) -> str:
    m, v, mm = report["machine"], report["versions"], report["matmul"]
    s = report["settings"]
    accel = f", {m['device_count']} x {m['device_kind']}" if m.get("platform") not in (None, "cpu") else ""
    libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "jaxlib", "flax", "torch", "timm", "onnxruntime")
                     if k in v)
    rate = f"jax {mm['jax_gflops']:.0f} GFLOP/s" + (f", torch {mm['torch_gflops']:.0f}"
                                                       if "torch_gflops" in mm else "")
    n, planned = report["rounds_completed"], report["settings"]["rounds"]
    stopped = f" ({n} of the {planned} rounds asked for: the run was stopped)" if n < planned else ""
    if report.get("round_in_progress"):  # cut short mid-round: its finished rows are shown
        stopped = (f" (the run was stopped in round {n + 1} of {planned}; the rows it finished are "
                   f"shown, the others are missing)")
        n += 1
    return (f"Host: {m['cpu']}, {m['cores']} cores{accel}, {_host_use(m)} "
            f"(load average, 1/5/15 min, on its {m['cores']} cores: {_loads(report)}); {libs}; "
            f"{report['date'][:10]}, commit {report['git_commit']}. Batch {s['batch']}, "
            f"{s['resolution']} px, {s['dtype']}; each figure is the median of {s['iters']} timed "
            f"steps after {s['warmup']} warm-up, then the median of {n} interleaved round"
            f"{'s' if n != 1 else ''}{stopped}. {mm['dtype']} {mm['n']}^3 matmul (median of the rounds): {rate}.\n"
            f"Command: `{report['command']}`\n")


def render_models(report: dict[str, Any]) -> str:
    rows = [r for r in report["results"] if r.get("framework") == "jax"]
    timm = {(r["model_key"], r["mode"]): r for r in report["results"]
            if r.get("framework") == "timm" and "images_per_s" in r}
    variants = list(dict.fromkeys(r.get("variant") for r in rows))
    show_variant = len(variants) > 1
    head = ["model", "mode"] + (["impl"] if show_variant else []) + [
        "ours img/s (rounds)", "timm img/s", "ours / timm", "peak RSS ours / timm (MiB)",
        "XLA peak (MiB)", "MFU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode in ("infer", "train"):
        for r in (r for r in rows if r["mode"] == mode):
            cells = [display_name(r["model"], r["form"], mode), mode]
            cells += [r.get("variant", "")] if show_variant else []
            if "images_per_s" not in r:
                why = r.get("skipped") or f"failed: {r.get('error', '?')}"
                lines.append("| " + " | ".join(cells + [f"skipped: {why}"] + [""] * 5) + " |")
                continue
            t = timm.get((r["model"].removesuffix("_hal"), mode))
            ips = r.get("images_per_s_rounds", [r["images_per_s"]])
            vs_timm = r.get("vs_timm_rounds", [r["vs_timm"]] if "vs_timm" in r else [])
            cells += [f"{_f(statistics.median(ips))} ({_rounds(ips)})",
                      _f(statistics.median(t.get("images_per_s_rounds", [t["images_per_s"]]))) if t else "",
                      _f(statistics.median(vs_timm)) if vs_timm else "",
                      f"{r['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f}" if t else f"{r['peak_rss_mib']:.0f}",
                      f"{r['xla_memory']['peak_mib']:.0f}" if r.get("xla_memory") else "",
                      f"{r['mfu']:.0%}" if "mfu" in r else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_speedups(report: dict[str, Any]) -> str:
    head = ["model", "mode", "hal / baseline per round", "median", "FLOP ideal", "median / ideal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report["hal_speedups"]:
        name = display_name(s["model"], s["form"], s["mode"])
        if s["variant"] not in ("plain", "auto", None):  # whose hal row: accel, pallas
            name = f"{name[:-1]}, {s['variant']})" if name.endswith(")") else f"{name} ({s['variant']})"
        if s.get("baseline_variant", s["variant"]) != s["variant"]:
            name += f" vs {s['baseline_variant']} baseline"
        median = statistics.median(s["speedup_rounds"])
        lines.append(f"| {name} | {s['mode']} | {_rounds(s['speedup_rounds'], 3)} | {_f(median, 3)}x | "
                     f"{_f(s['flop_ideal'], 3)}x | {_f(median / s['flop_ideal'])} |")
    return "\n".join(lines) + "\n"


def render_complexity(rows: list[dict[str, Any]]) -> str:
    by_name = {r["model"]: r for r in rows if r["form"] == "deploy"}
    head = ["model", "params (M)", "MACs (G)", "hal (deploy) params", "hal (deploy) MACs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in by_name.items():
        hal = by_name.get(name + "_hal")
        if name.endswith("_hal") or hal is None:
            continue
        p, m = r["params"] / 1e6, r["macs"] / 1e9
        hp, hm = hal["params"] / 1e6, hal["macs"] / 1e9
        lines.append(f"| {display_name(name)} | {p:.3f} | {m:.3f} | {hp:.3f} ({(hp / p - 1):+.2%}) | "
                     f"{hm:.3f} ({(hm / m - 1):+.2%}) |")
    return "\n".join(lines) + "\n"


def render_onnx_ops(report: dict[str, Any]) -> str:
    rows = report["results"]
    head = ["op"] + [f"{display_name(r['model'])} {when}" for r in rows for when in ("before", "after")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ops = sorted({op for r in rows for when in ("before", "after") for op in r[when]})
    for op in ops:
        counts = [r[when].get(op, 0) for r in rows for when in ("before", "after")]
        lines.append(f"| `{op}` | " + " | ".join(str(c) for c in counts) + " |")
    lines.append("| **nodes** | " + " | ".join(f"**{r['nodes_' + w]}**" for r in rows for w in ("before", "after")) + " |")
    lines.append("| logit error (relative) | " + " | ".join(f"{r['rel_error_' + w]:.1e}" for r in rows
                                                       for w in ("before", "after")) + " |")
    return "\n".join(lines) + "\n"


def _wall(seconds: float) -> str:
    """Seconds as ``M min S s`` (``S s`` under a minute)."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def render_ci(report: dict[str, Any]) -> str:
    """One sentence: when CI last ran both tiers here, how long each took and what it ran."""
    ci = report["ci"]

    def tier(name: str) -> str:
        t = ci["tiers"][name]
        counts = ", ".join(f"{n} {kind}" for kind, n in t.get("counts", {}).items()
                           if kind in ("passed", "failed", "skipped", "error"))
        status = "" if t["exit"] == 0 else f", exit {t['exit']}"
        return f"{_wall(t['wall_seconds'])} ({counts}{status})"

    cpus = ci.get("cpus") or report["machine"]["cores"]
    load = ci.get("load_average_start")
    load = f", load average {load[0]:.1f} at the start" if load else ""
    job = (f", the whole job {_wall(ci['job_wall_seconds'])} with the install"
           if ci.get("job_wall_seconds") else "")
    return (f"Measured {ci['date']} by `.ci/run` on a fresh clone of commit {ci['commit']}, "
            f"{cpus} CPUs{load}: the fast tier took {tier('fast')}, the slow tier "
            f"{tier('slow')}{job}.\n")


def render_remat(report: dict[str, Any]) -> str:
    """benchmarks/remat_memory.py: per remat setting, the activations autodiff keeps for the
    backward pass and XLA's peak for the compiled step, each with its ratio to ``none``."""
    s, rows = report["settings"], report["results"]
    base = next((r for r in rows if r["remat"] == "none"), rows[0])
    libs = ", ".join(f"{k} {report['versions'][k]}" for k in ("jax", "jaxlib", "flax") if k in report["versions"])
    head = (f"{display_name(s['model'])} train step (loss and gradient), batch {s['batch']}, float32, "
            f"`impl={s['impl']}`, XLA {report['backend'].upper()}; {libs}; {report['date'][:10]}, commit "
            f"{report['git_commit']}. These are sizes from the compiled step's memory analysis, not "
            f"timings, so the host's load (it was shared) does not change them.\n"
            f"Command: `{report['command']}`\n\n")
    lines = ["| remat | activations kept for the backward pass | / none | XLA peak | / none |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['remat']}` | {r['residual_mib']:.0f} MiB | {r['residual_mib'] / base['residual_mib']:.2f} | "
                     f"{r['peak_mib']:.0f} MiB | {r['peak_mib'] / base['peak_mib']:.2f} |")
    return head + "\n".join(lines) + "\n"


# Quotes, not measurements: timm's published param_count (M) / GMACs at 224, the paper's
# hMHSA + cFFN reductions (deploy form, %) and the paper's Next-ViT-S GMACs at 384.
PUBLISHED_224 = {"deit_tiny": (5.72, 1.26), "deit_small": (22.05, 4.61), "pvt_v2_b1": (14.01, 2.12),
                 "nextvit_small": (31.76, 5.81)}
PAPER_REDUCTIONS = {"pvt_v2_b1_hal": (-13.2, -15.2), "nextvit_small_hal": (-13.9, -11.5)}
PAPER_GMACS_384 = {"nextvit_small": 17.3}


def _complexity_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["model"], r["form"]): r for r in rows}


def _change(rows, hal: str, form: str) -> tuple[float, float]:
    """Signed % change in params and MACs of ``hal`` over its baseline, both in ``form``."""
    r, b = rows[hal, form], rows[hal.removesuffix("_hal"), form]
    return 100 * (r["params"] / b["params"] - 1), 100 * (r["macs"] / b["macs"] - 1)


def render_complexity_full(rows: list[dict[str, Any]]) -> str:
    """docs/complexity.md: every model in both forms with the change against its baseline, then
    the published totals and the paper's reductions, each with our difference from it."""
    by = _complexity_rows(rows)
    head = ["model", "form", "params", "params (M)", "MACs (G)", "params vs baseline", "MACs vs baseline"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        forms = [f for f in ("train", "deploy") if (name, f) in by]
        if not name.endswith("_hal") and len({(by[name, f]["params"], by[name, f]["macs"]) for f in forms}) == 1:
            r = by[name, forms[0]]
            lines.append(f"| `{name}` | {' / '.join(forms)} | {r['params']:,} | {r['params'] / 1e6:.2f} | "
                         f"{r['macs'] / 1e9:.3f} | | |")
            continue
        for form in forms:
            r = by[name, form]
            cells = [f"`{name}`", form, f"{r['params']:,}", f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.3f}"]
            if name.endswith("_hal") and (name.removesuffix("_hal"), form) in by:
                dp, dm = _change(by, name, form)
                bold = "**" if form == "deploy" else ""
                cells += [f"{bold}{dp:+.2f}%{bold}", f"{bold}{dm:+.2f}%{bold}"]
            else:
                cells += ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n\nHow these compare with published numbers:\n"
    pub = [(n, *PUBLISHED_224[n], by[n, "deploy"]) for n in PUBLISHED_224 if (n, "deploy") in by]
    out += "- **Published totals** (timm `param_count` / GMACs, quoted; ours in brackets):\n"
    for n, p, m, r in pub:
        out += (f"  - {display_name(n)}: {p:.2f}M / {m:.2f}G (ours {r['params'] / 1e6:.2f}M, "
                f"{100 * (r['params'] / 1e6 / p - 1):+.2f}%; {r['macs'] / 1e9:.3f}G, "
                f"{100 * (r['macs'] / 1e9 / m - 1):+.2f}%).\n")
    same = all(round(r["params"] / 1e6, 2) == p for _, p, _, r in pub)
    worst = max(abs(100 * (r["macs"] / 1e9 / m - 1)) for _, _, m, r in pub)
    out += ("\n  Our parameter counts " + ("round to the published ones" if same else "differ from the published ones")
            + f" at the 0.01M they are given to; our MACs are within {worst:.2f}% of the published figures.\n")
    out += "- **Paper's reductions** for hMHSA + cFFN (deploy forms; the paper's, then ours):\n"
    gaps = []
    for hal, (pp, pm) in PAPER_REDUCTIONS.items():
        if (hal, "deploy") not in by:
            continue
        dp, dm = _change(by, hal, "deploy")
        gaps += [dp - pp, dm - pm]
        out += (f"  - {display_name(hal.removesuffix('_hal'))}: paper {pp:+.1f}% params / {pm:+.1f}% MACs; "
                f"ours {dp:+.2f}% / {dm:+.2f}% ({dp - pp:+.2f} / {dm - pm:+.2f} points).\n")
    if gaps:
        out += (f"\n  All {len(gaps)} differences are within {max(abs(g) for g in gaps):.2f} points. "
                "The paper does not report reductions for DeiT.\n")
    return out


def render_complexity_384(rows: list[dict[str, Any]]) -> str:
    """A baseline's MACs at another resolution against the paper's quoted figure there."""
    out = []
    for r in rows:
        paper = PAPER_GMACS_384.get(r["model"])
        if r["form"] == "deploy" and paper and r["resolution"] == 384:
            g = r["macs"] / 1e9
            out.append(f"At {r['resolution']}, {display_name(r['model'])} measures {g:.2f}G MACs, against "
                       f"{paper}G in the paper ({100 * (g / paper - 1):+.2f}%).")
    return "\n".join(out) + "\n"


def render_complexity_paper(rows: list[dict[str, Any]]) -> str:
    """docs/design.md section 4: our reductions for the paper's pairs, from complexity.json."""
    by = _complexity_rows(rows)
    parts = []
    for hal in PAPER_REDUCTIONS:
        if (hal, "deploy") in by:
            dp, dm = _change(by, hal, "deploy")
            parts.append(f"{display_name(hal.removesuffix('_hal'))} {dp:+.2f}% parameters and {dm:+.2f}% MACs")
    return ("With the definitions above and even heads, `halluvit_jax.complexity` counts (deploy form, 224 px; "
            f"`benchmarks/results/complexity.json`) {' and '.join(parts)}: the check that fixed the even-head "
            "and `c'` choices.\n")


def _run_ablations():
    """scripts/run_ablations.py, whose summarize / direction_rows the ablation kinds call."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_ablations", os.path.join(ROOT, "scripts", "run_ablations.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render_ablations(results: dict[str, Any]) -> str:
    """The grid of scripts/run_ablations.py: per setting, mean ± sample std over seeds."""
    return _run_ablations().markdown_table(results) + "\n"


def render_ablation_directions(results: dict[str, Any]) -> str:
    """Each direction the paper claims, with our mean difference, its s.e. and the verdict."""
    return _run_ablations().directions_table(results) + "\n"


def render_ablation_summary(results: dict[str, Any]) -> str:
    """The 'Plainly' bullets of docs/ablations.md: every percentage and count computed here."""
    ra = _run_ablations()
    rows = {r["ablation"]: r for r in ra.summarize(results)}
    dirs = ra.direction_rows(results)
    base, hal = rows["baseline"], rows["ihh_chh"]
    pct = lambda a, b, k: 100 * (a[k] / b[k] - 1)  # noqa: E731
    ts = [rows[t] for t in ("t1_2", "ihh_chh", "t3_4") if t in rows]
    t_ordered = len(ts) == 3 and all(a[k] < b[k] for a, b in zip(ts, ts[1:]) for k in ("params", "macs"))
    same_cost = [a for a in ("r1", "r3", "w1") if a in rows]
    folds = all(rows[a]["params"] == hal["params"] and rows[a]["macs"] == hal["macs"] for a in same_cost)
    out = [f"- **Cost** (arithmetic, not training): hMHSA + cFFN cuts params by "
           f"{-pct(hal, base, 'params'):.1f}% and MACs by {-pct(hal, base, 'macs'):.1f}% against the "
           f"baseline (the paper: 10-20%); the compact ratio t {'orders' if t_ordered else 'does not order'} "
           "cost as in Table 7 (t = 1/2 < 2/3 < 3/4)"]
    if "plain_ffn" in rows:
        pf = rows["plain_ffn"]
        out[-1] += (f"; the plain FFN with m = 3.34 differs from the cFFN's cost by {pct(pf, hal, 'params'):+.2f}% "
                    f"params and {pct(pf, hal, 'macs'):+.2f}% MACs (Table 5 compares at equal cost)")
    if same_cost:
        out[-1] += f"; {', '.join(same_cost)} {'have' if folds else 'do not have'} the default's deploy cost"
    out[-1] += ".\n"
    ccs = next((d for d in dirs if d["metric"] == "ccs"), None)
    if ccs:
        n = min(ccs["n"])
        z = abs(ccs["diff"]) / ccs["se"] if ccs["se"] else float("inf")
        out.append(f"- **Head redundancy (Table 4)**, verdict *{ccs['verdict']}*: mean CCS "
                   f"{rows[ccs['lower']]['ccs_mean']:.3f} ({ccs['lower']}) vs {rows[ccs['higher']]['ccs_mean']:.3f} "
                   f"({ccs['higher']}) after {results['epochs']:g} epochs, {z:.1f} s.e. at {n} seeds.\n")
    acc = [d for d in dirs if d["metric"] == "top1"]
    name = lambda d: f"`{d['higher']}` > `{d['lower']}` (Table {d['table']}, {d['diff']:+.2f} pts)"  # noqa: E731
    group = lambda verdict: [name(d) for d in acc if d["verdict"] == verdict]  # noqa: E731
    holds, same, opposite = group("holds"), group("within noise (same sign)"), group("within noise (opposite sign)")
    stds = [r["top1_std"] for r in rows.values() if r["seeds"] > 1]
    out.append((f"- **{len(holds)} accuracy direction{'s' if len(holds) != 1 else ''} of the paper "
                f"{'hold' if len(holds) != 1 else 'holds'} beyond noise**: {', '.join(holds)}." if holds else
                "- **No accuracy direction of the paper is confirmed beyond noise at this scale.**")
               + f" Within noise with the paper's sign: {', '.join(same) or 'none'}; with the opposite sign: "
               f"{', '.join(opposite) or 'none'}" + (f"; seed noise (top-1 std over seeds) "
                                                     f"{min(stds):.1f}-{max(stds):.1f} points" if stds else "") + ".\n")
    rev = [d for d in acc if d["verdict"] == "reversed"]
    means = [r["top1_mean"] for r in rows.values()]
    out.append((f"- **{len(rev)} accuracy direction{'s are' if len(rev) != 1 else ' is'} reversed beyond noise**: "
                + ", ".join(f"`{d['lower']}` beats `{d['higher']}` by {-d['diff']:.2f} pts (Table {d['table']})"
                            for d in rev) + "." if rev else "- **No accuracy direction is reversed beyond noise.**")
               + f" The {results['epochs']:g}-epoch settings reach {min(means):.1f}-{max(means):.1f}% top-1 "
               "(means over seeds).\n")
    return "".join(out)


def render_parity(report: dict[str, Any]) -> str:
    """benchmarks/parity.py: each comparison of tests/test_convert_timm.py, its largest difference,
    the tolerance the test asserts and the fraction of it used."""
    v = report["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "jaxlib", "torch", "timm") if k in v)
    lines = [f"Measured by `{report['command']}` ({report['backend'].upper()}, float32; {libs}; "
             f"{report['date'][:10]}, commit {report['git_commit']}):", "",
             "| check | test (`tests/test_convert_timm.py`) | max abs diff | tolerance | diff / tolerance |",
             "|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['check']} | `{r['test']}` | {r['max_abs_diff']:.1e} | {r['tolerance']:.1e} | "
                     f"{r['max_abs_diff'] / r['tolerance']:.2%} |")
    return "\n".join(lines) + "\n"


# The demo-run figures (benchmarks/demo_figures.py): training, conversion and CCS of the digits demo.


def _pct(fraction: float, digits: int = 2) -> str:
    return f"{100 * fraction:.{digits}f}%"


def _demo_host(report: dict[str, Any]) -> str:
    """Where and when a demo_figures.py run was measured, with the load it ran under."""
    m = report["machine"]
    load = _load_avg(m.get("load_average_start"))
    if m.get("load_average_end"):
        load += f" at the start, {_load_avg(m['load_average_end'])} at the end"
    quick = " (a --quick smoke run: 1-epoch trainings)" if report.get("quick") else ""
    return (f"{m['cores']} cores of an {m['cpu']}, {_host_use(m)} (load average, 1/5/15 min: {load}), "
            f"{report['date'][:10]}, commit {report['git_commit']}{quick}")


def render_demo_train(report: dict[str, Any]) -> str:
    """docs/training.md: what the 60-epoch demo reached, in how many steps and how long."""
    d = report["demo"]
    ips = d.get("images_per_sec")
    rate = f"; {ips['min']:.0f}-{ips['max']:.0f} images/s once compiled" if ips else ""
    return (f"In {d['epochs']:g} epochs ({d['steps']} steps of {d['batch']} images) it reaches "
            f"**{_pct(d['top1'])} validation top-1 (top-5 {_pct(d['top5'])}) in {_wall(d['wall_s'])} "
            f"wall-clock** (`{d['command'].split(' --workdir')[0]}` on {_demo_host(report)}{rate}"
            f"{'' if _idle(report['machine']) else '; faster on an idle host'}; "
            f"`{report['command']}` measured it).\n")


def render_demo_progress(report: dict[str, Any]) -> str:
    """docs/training.md: a progress line the 60-epoch demo printed."""
    line = report["demo"].get("progress_line", "step N/TOTAL | loss L | lr LR | X img/s | ETA H:MM:SS")
    return f"The progress line reads `{line}` (a line of the run above).\n"


def _demo_compare(report: dict[str, Any]) -> dict[str, Any]:
    """The differences the docs state: fine-tuned hal vs baseline, and the step ratio."""
    p = report["pipeline"]
    base, ft = p["baseline"], p["finetune"]
    gap = 100 * (base["top1"] - ft["top1"])
    return {"gap_points": gap, "step_ratio": base["steps"] / ft["steps"] if ft["steps"] else float("nan")}


def render_demo_runs(report: dict[str, Any]) -> str:
    """docs/conversion.md "Demo figures": the pipeline's table, the conversion report and the comparison."""
    p = report["pipeline"]
    base, conv, ft, scr, dep = (p[k] for k in ("baseline", "converted", "finetune", "scratch", "deploy"))
    cal = conv.get("calibration") or {}
    n_cal = conv["report"].get("images", cal.get("images"))
    same = dep["top1"] == ft["top1"]
    dep_note = "(identical)" if same else f"({100 * (dep['top1'] - ft['top1']):+.2f} points)"
    rows = [
        ("baseline `deit_tiny` (`configs/demo_baseline.py`, " f"{base['epochs']:g} epochs)", base["steps"],
         _pct(base["top1"]), _wall(base["wall_s"])),
        ("converted `deit_tiny_hal`, before fine-tuning", 0, _pct(conv["top1"]),
         f"{_wall(conv['wall_s'])} (conversion, {n_cal} calibration images)"),
        (f"converted + fine-tune (`configs/finetune.py:model=demo`, {ft['epochs']:g} epochs)", ft["steps"],
         f"**{_pct(ft['top1'])}**", _wall(ft["wall_s"])),
        (f"`deit_tiny_hal` from scratch (`configs/demo.py:ci`, {scr['epochs']:g} epochs)", scr["steps"],
         _pct(scr["top1"]), _wall(scr["wall_s"])),
        ("fine-tuned, deploy export (`convert deploy`), evaluated", "-", f"{_pct(dep['top1'])} {dep_note}",
         f"{_wall(dep['wall_s'])} + {_wall(dep['eval_wall_s'])}"),
    ]
    shared = "" if _idle(report["machine"]) else "; wall-clock times on a shared host are noisy and only indicative"
    lines = [f"Measured with the commands below on {_demo_host(report)} (`{report['command']}` ran them)"
             f"{shared}.", "",
             "| model | steps | validation top-1 | wall |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    rc, rr = conv["report"]["converted"], conv["report"].get("random_init")
    rand = (f" (a randomly initialized hal model: {rr['cosine']:.3f} and {_pct(rr['top1_agreement'], 1)})"
            if rr else "")
    cmp = _demo_compare(report)
    gap = cmp["gap_points"]
    rel = "comes within {:.1f} points of the baseline trained {:.0f}x longer" if gap >= 0 else \
        "beats by {:.1f} points the baseline trained {:.0f}x longer"
    lines += ["", f"Conversion report on the {n_cal} calibration images: logit cosine {rc['cosine']:.3f} and "
              f"top-1 agreement {_pct(rc['top1_agreement'], 1)} with the baseline{rand}. The fine-tuned hal "
              f"model {rel.format(abs(gap), cmp['step_ratio'])}; from scratch, the same "
              f"{scr['steps']} steps give {_pct(scr['top1'], 1)}."]
    return "\n".join(lines) + "\n"


def render_demo_summary(report: dict[str, Any]) -> str:
    """README.md: the demo conversion's accuracies in one sentence."""
    p = report["pipeline"]
    base, conv, ft, scr = (p[k] for k in ("baseline", "converted", "finetune", "scratch"))
    return (f"On the demo digits (same reduced DeiT; commands, times and the machine in "
            f"[docs/conversion.md](docs/conversion.md#demo-figures)): baseline {_pct(base['top1'], 1)}; "
            f"converted hal {_pct(conv['top1'], 1)} before and **{_pct(ft['top1'], 1)} after a "
            f"{ft['steps']}-step fine-tune**, against {_pct(scr['top1'], 1)} for the hal model trained from "
            f"scratch for the same {scr['steps']} steps.\n")


def _ccs_direction(report: dict[str, Any]) -> str:
    c = report["ccs"]
    return ("the paper's direction" if c["hal"]["ccs"] < c["baseline"]["ccs"]
            else "against the paper's direction, which is lower for hMHSA")


def render_demo_ccs_summary(report: dict[str, Any]) -> str:
    """README.md: CCS of the demo hal model vs the baseline."""
    c, d, b = report["ccs"], report["demo"], report["pipeline"]["baseline"]
    return (f"CCS (paper Table 4) on the {c['hal']['num_images']} validation digits: {c['hal']['ccs']:.3f} for "
            f"the demo hal model ({d['epochs']:g} epochs, `python train.py --config configs/demo.py`) vs "
            f"{c['baseline']['ccs']:.3f} for the baseline ({b['epochs']:g} epochs, `configs/demo_baseline.py`), "
            f"{_ccs_direction(report)}; measured {report['date'][:10]} with the command above, run by "
            f"`{report['command']}` ([docs/ablations.md](docs/ablations.md) has the per-block scores).\n")


def _pair_range(blocks: list[dict[str, Any]], pairs) -> str:
    """min-max of similarity[i][j] over blocks 1.. and the (i, j) ``pairs(heads)`` gives."""
    vals = [b["similarity"][i][j] for b in blocks[1:] if b.get("similarity") for i, j in pairs(b["heads"])]
    if not vals:
        return "not recorded"
    lo, hi = f"{min(vals):.2f}", f"{max(vals):.2f}"
    return lo if lo == hi else f"{lo}-{hi}"


def render_demo_ccs(report: dict[str, Any]) -> str:
    """docs/ablations.md: per-block CCS of the demo hal model and the baseline, and the head pairs behind it."""
    c, d, b = report["ccs"], report["demo"], report["pipeline"]["baseline"]
    hal, base = c["hal"], c["baseline"]
    nblocks = len(hal["blocks"])
    lines = [f"`python -m halluvit_jax.analysis ccs --checkpoint WORKDIR --data demo --similarity` on the hal demo "
             f"model ({d['epochs']:g} epochs of `configs/demo.py`, {_pct(d['top1'], 1)} top-1) and a baseline "
             f"`deit_tiny` of the same shape ({base['blocks'][0]['heads']} heads, {b['epochs']:g} epochs of "
             f"`configs/demo_baseline.py`, {_pct(b['top1'], 1)} top-1), on the {hal['num_images']} validation "
             f"digits (measured {report['date'][:10]} by `{report['command']}`):", "",
             "| model | " + " | ".join(f"block {i}" for i in range(nblocks)) + " | CCS |",
             "|---|" + "---|" * (nblocks + 1)]
    for label, r in (("`deit_tiny` (MHSA)", base), ("`deit_tiny_hal` (hMHSA)", hal)):
        lines.append(f"| {label} | " + " | ".join(f"{x['score']:.3f}" for x in r["blocks"])
                     + f" | **{r['ccs']:.3f}** |")
    half = lambda h: h // 2
    own = _pair_range(hal["blocks"], lambda h: [(i, half(h) + i) for i in range(half(h))])
    real = _pair_range(hal["blocks"], lambda h: [(i, j) for i in range(half(h)) for j in range(i + 1, half(h))])
    allp = _pair_range(base["blocks"], lambda h: [(i, j) for i in range(h) for j in range(i + 1, h)])
    last = nblocks - 1
    text = f"(Mean over the validation images; {_ccs_direction(report)}.)"
    if all(b.get("similarity") for b in hal["blocks"] + base["blocks"]):
        text += (f" Head-pair similarities in blocks 1-{last}: in the hal model, each hallucinated head against "
                 f"the real head it starts as a copy of (identity-initialized IHH/CHH, pairs real i / hal i) "
                 f"{own}, the real heads against each other {real}; the baseline's head pairs {allp}.")
    lines += ["", text]
    return "\n".join(lines) + "\n"


# --- benchmarks/input_pipeline.py (docs/data.md) -------------------------------------------


def _ip_load(report: dict[str, Any]) -> str:
    return (f"load average (1/5/15 min) {_load_avg(report['machine'].get('load_average_start'))} at the "
            f"start, {_load_avg(report.get('load_average_end'))} at the end")


def _ip_medians(report: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Our chains (chain -> back-end -> median CPU-ms/img) and tf.data's (chain -> median),
    from every repetition in the report."""
    ours = {name: {b: statistics.median(reps) for b, reps in row.items()}
            for name, row in report["cpu_ms_per_image_reps"].items()}
    tf = {name: statistics.median(reps)
          for name, reps in (report.get("tf_data_cpu_ms_per_image_reps") or {}).items() if reps}
    return ours, tf


def _tf_name(name: str) -> str:
    return _cell(name.removeprefix("tf.data: "))


def _cell(name: str) -> str:
    """A chain name as a table cell: the ops in code, their ``|`` escaped (GFM tables); a name
    in words ("full decode only (yardstick)") as it is."""
    label, sep, chain = name.rpartition(": ")
    if not sep and " " in chain:
        return chain
    return f"{label}{sep}`{chain.replace('|', chr(92) + '|')}`"


def _idle(machine: dict[str, Any]) -> bool:
    """Whether the host was idle when the run started: a recorded 1-minute load below a quarter
    of its cores (0.5 on this 2-core host; 4 on the 16-core host of a lent GPU)."""
    load = machine.get("load_average_start")
    return bool(load) and load[0] < 0.25 * (machine.get("cores") or 2)


def _host_use(machine: dict[str, Any]) -> str:
    """`_idle` in words; the load figures printed beside it say how busy."""
    return "idle when the run started" if _idle(machine) else "not idle when the run started"


def render_input_pipeline(report: dict[str, Any]) -> str:
    """The whole benchmark: host, load and versions; CPU-ms/img of every chain and back-end;
    tf.data's chains and each of our chains over its tf.data twin; the grain pipeline."""
    m, v, s, d = report["machine"], report["versions"], report["settings"], report["dataset"]
    ours, tf = _ip_medians(report)
    backends = report.get("backends") or list(next(iter(ours.values())))
    libs = ", ".join(f"{k} {v[k]}" for k in ("opencv-python-headless", "simplejpeg", "turbojpeg",
                                             "tensorflow", "tensorflow-cpu", "grain", "jax") if k in v)
    out = [f"Host: {m['cpu']}, {m['cores']} cores, {_host_use(m)} "
           f"({_ip_load(report)}); {libs}; {report['date'][:10]}, commit {report['git_commit']}. "
           f"{d['train_jpegs']} train JPEGs, mean {d['mean_height_width'][0]:.0f}x"
           f"{d['mean_height_width'][1]:.0f} (HxW). Single thread, process CPU-ms per image, "
           f"median of {s['reps']} repetitions (every repetition of the best back-end in the last "
           f"column).",
           f"Command: `{report['command']}`", ""]
    head = ["ops", *backends, "best back-end: runs"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in ours.items():
        best = min(row, key=row.get)
        runs = _rounds(report["cpu_ms_per_image_reps"][name][best], 3)
        out.append(f"| {_cell(name)} | " + " | ".join(_f(row[b], 3) if b in row else "" for b in backends)
                   + f" | {best}: {runs} |")
    out.append("")
    if not tf:
        out.append("tf.data: not timed in this run (TensorFlow was not installed), so there are no "
                   "tf.data rows and no ratios to tf.data.")
    else:
        out += ["| tf.data chain, same JPEGs, single thread | CPU-ms/img | runs |", "|---|---|---|"]
        for name, med in tf.items():
            runs = _rounds(report["tf_data_cpu_ms_per_image_reps"][name], 3)
            out.append(f"| {_tf_name(name)} | {_f(med, 3)} | {runs} |")
        out += ["", "Same-run ratios, ours (best back-end) / tf.data; below 1 is less CPU than tf.data:",
                "", "| ours | tf.data chain | ours / tf.data |", "|---|---|---|"]
        for name, ref in report.get("tf_data_reference", {}).items():
            if name in ours and ref in tf:
                out.append(f"| {_cell(name)} | {_tf_name(ref)} | {_f(min(ours[name].values()) / tf[ref])}x |")
    out += ["", f"Full grain pipeline ({s['threads']} threads, batch {s['batch_size']}, "
            f"{s['batches']} batches, back-end {backends[-1]}), wall clock and process CPU:", "",
            "| pipeline | img/s | CPU-ms/img |", "|---|---|---|"]
    for name, r in report["full_pipeline"].items():
        out.append(f"| {name} | {r['images_per_s']:.0f} | {_f(r['cpu_ms_per_image'], 3)} |")
    return "\n".join(out) + "\n"


def render_input_pipeline_target(report: dict[str, Any]) -> str:
    """The verdict on the target (train preprocessing without RandAugment at or below tf.data's
    per-image CPU cost) and where tf.data's cost goes, every ratio and difference computed here."""
    ours, tf = _ip_medians(report)
    best = lambda name: min(ours[name].values())
    ref = report.get("tf_data_reference", {})
    default, accurate = "train: rrc|flip|normalize", "train: rrc(fast=0)|flip|normalize"
    uint8 = "train: rrc|flip|normalize(on_device=1)"
    if not tf or ref.get(default) not in tf or ref.get(uint8) not in tf:
        return (f"**Target (train preprocessing without RandAugment at or below tf.data's per-image "
                f"CPU cost): not judged by this run**, which did not time tf.data (TensorFlow was not "
                f"installed). Our default chain `rrc|flip|normalize` cost {_f(best(default), 3)} "
                f"CPU-ms/img, the uint8 one {_f(best(uint8), 3)} ({_ip_load(report)}).\n")
    tf_float, tf_uint8 = tf[ref[default]], tf[ref[uint8]]
    r_default, r_uint8 = best(default) / tf_float, best(uint8) / tf_uint8
    verdict = "met" if max(r_default, r_uint8) <= 1 else "not met"
    text = (f"**Target (train preprocessing without RandAugment at or below tf.data's per-image CPU "
            f"cost): {verdict} in this run** ({_ip_load(report)}). Our default chain "
            f"`rrc|flip|normalize` costs {_f(r_default)}x of the tf.data chain doing the same work "
            f"({_f(best(default), 3)} vs {_f(tf_float, 3)} ms)")
    if accurate in ours:
        text += f", {_f(best(accurate) / tf_float)}x with the accurate IDCT (`fast=0`)"
    text += (", although ours resizes bicubic and tf.data bilinear. With uint8 output "
             f"(normalization on the device) ours costs {_f(r_uint8)}x of tf.data without any "
             f"normalization ({_f(best(uint8), 3)} vs {_f(tf_uint8, 3)} ms)")
    if "sj" in ours[uint8]:
        text += (f", and {_f(ours[uint8]['sj'] / tf_uint8)}x without the optional `[fastjpeg]` "
                 f"extra (simplejpeg only: {_f(ours[uint8]['sj'], 3)} ms)")
    text += "."
    crop = tf.get("tf.data: decode_and_crop")
    bicubic = tf.get("tf.data: decode_and_crop|bicubic|flip")
    if crop is not None:
        text += (f" Where tf.data's cost goes, from the same JPEGs: `decode_and_crop_jpeg` alone "
                 f"{_f(crop, 3)} ms; resize to 224 and flip add {_f(tf_uint8 - crop, 3)} ms "
                 f"(bilinear)" + (f" or {_f(bicubic - crop, 3)} ms (bicubic)" if bicubic else "")
                 + f"; its broadcast per-channel normalization adds {_f(tf_float - tf_uint8, 3)} ms.")
    return text + "\n"


def render_fast_decode(report: dict[str, Any]) -> str:
    """``fast=1/2`` decoding against ``fast=0``: PSNR and mean absolute difference over the
    images (range and median), and the CPU saved (from the medians of the repetitions)."""
    fd = report.get("fast_decode")
    if not fd:
        return "(Not measured: simplejpeg was not installed when the benchmark ran.)\n"
    ms = {k: statistics.median(v) for k, v in fd["cpu_ms_per_image_reps"].items()}

    def level(fast: str) -> str:
        psnr, mad = fd["psnr_db"][fast], fd["mean_abs_diff"][fast]
        same = fd.get("identical_images", {}).get(fast, 0)
        saving = 1 - ms[fast] / ms["0"]
        return (f"{min(psnr):.1f}-{max(psnr):.1f} dB PSNR (median {statistics.median(psnr):.1f}"
                + (f", {same} images bit-identical left out" if same else "")
                + f"; mean absolute difference {min(mad):.2f}-{max(mad):.2f} gray levels) and makes "
                f"the full-size decode {abs(saving):.0%} {'cheaper' if saving >= 0 else 'dearer'} "
                f"({_f(ms[fast], 3)} vs "
                f"{_f(ms['0'], 3)} CPU-ms/img)")

    return (f"Against `fast=0`, on the {fd['images']} photos of the [benchmark](#benchmark) "
            f"(single thread, median of {report['settings']['reps']}, {_ip_load(report)}), `2` is "
            f"{level('2')}; `1` alone is {level('1')}.\n")


AOT_FAMILIES = {"deit_s": "DeiT-S", "pvt_v2_b1": "PVTv2-b1", "nextvit_s": "NextViT-S"}


def _base_to_hal(base: dict | None, hal: dict | None, get, fmt: str) -> str:
    """``base -> hal (hal/base x)`` of one figure of two aot program reports."""
    a, b = (get(p) if p else None for p in (base, hal))
    if a is None and b is None:
        return "not compiled"
    ratio = f" ({b / a:.2f}x)" if a and b else ""
    return f"{'?' if a is None else format(a, fmt)} -> {'?' if b is None else format(b, fmt)}{ratio}"


def _aot_loads(configs: dict[str, Any]) -> str:
    """The host's 1-minute load around the compiles, as recorded (before each where known; after
    each includes the compile's own threads)."""
    measured = [r.get("measured", {}) for r in configs.values()]
    before = [m["load_average_start"][0] for m in measured if m.get("load_average_start")]
    after = [m["load_average_end"][0] for m in measured if m.get("load_average_end")]
    missing = sum(1 for m in measured if not m.get("load_average_end"))
    parts = []
    if before:
        parts.append(f"1-min load average {min(before):.1f}-{max(before):.1f} before a compile (it still "
                     "counts the compile before, when they run back to back)")
    if after:
        parts.append(f"{min(after):.1f}-{max(after):.1f} after one (its own threads included)")
    if missing:
        parts.append(f"{missing} config(s) without a recorded load (compiled beside other jobs)")
    return "; ".join(parts) or "load not recorded"


def _aot_variant(key: str) -> str:
    """The label of a hal row compiled as ``{family}_hal@IMPL[,FIELD=V...]`` (``aot_table.py run
    --impl IMPL [--model_flag FIELD=V]``)."""
    impl, *flags = key.split(",")
    return f", hal `impl={impl}`" + "".join(f", `{f}`" for f in flags)


def render_aot(table: dict[str, Any]) -> str:
    """Base vs hal per family and program, from benchmarks/aot_table.py's aot_table.json; a hal
    compiled with another impl (``{family}_hal@{impl}``, ``aot_table.py run --impl``), or with model
    fields set as well (``{family}_hal@{impl},{field}={value}``, ``--model_flag``), is a row of its
    own against the same baseline."""
    configs = table["configs"]
    families = list(AOT_FAMILIES) + sorted({c.split("@")[0].removesuffix("_hal") for c in configs}
                                           - set(AOT_FAMILIES))
    impls = sorted({c.split("@")[1] for c in configs if "@" in c})

    def secs(program, p, rep):
        if p:
            return f"{p['compile_s']:.0f}"
        timed_out = (rep or {}).get("timed_out_s", {})
        return f"> {timed_out[program]}" if program in timed_out else "-"

    from halluvit_jax.aot import PEAK_BY_KIND, roofline

    kind = next((r["device_kind"] for r in configs.values() if r.get("device_kind")), "")

    def roofline_ms(p):
        bound = roofline(kind, p["cost"]["flops"], p["cost"]["bytes_accessed"])
        return None if bound is None else 1e3 * bound[0]

    lines = []
    for program, title in (("deploy_forward", "Deploy forward"), ("train_step", "Train step")):
        lines += [f"**{title}**, per chip:", "",
                  "| model | TFLOPs base -> hal | HBM GB accessed base -> hal | roofline ms base -> hal "
                  "| peak GiB base -> hal | compile s base / hal |", "|---|---|---|---|---|---|"]
        for family in families:
            for impl in [None, *impls]:
                hal_key = f"{family}_hal" + (f"@{impl}" if impl else "")
                if impl and hal_key not in configs:
                    continue
                reps = [configs.get(family), configs.get(hal_key)]
                base, hal = ((r or {}).get("programs", {}).get(program) for r in reps)
                if impl and hal is None and program not in reps[1].get("timed_out_s", {}):
                    continue  # that row's config was compiled for the other program only
                label = AOT_FAMILIES.get(family, family) + (_aot_variant(impl) if impl else "")
                lines.append(
                    f"| {label} "
                    f"| {_base_to_hal(base, hal, lambda p: p['cost']['flops'] / 1e12, '.3f')} "
                    f"| {_base_to_hal(base, hal, lambda p: p['cost']['bytes_accessed'] / 1e9, '.2f')} "
                    f"| {_base_to_hal(base, hal, roofline_ms, '.1f')} "
                    f"| {_base_to_hal(base, hal, lambda p: p['memory']['peak'] / 2**30, '.2f')} "
                    f"| {secs(program, base, reps[0])} / {secs(program, hal, reps[1])} |")
        lines.append("")
    meta = next((r for r in configs.values() if r.get("info")), None)
    if meta:
        info = meta["info"]
        dates = sorted({r.get("measured", {}).get("date", "?")[:10] for r in configs.values()})
        commands = [table["command"]] + sorted({r["measured"]["command"] for r in configs.values()
                                                 if r.get("measured", {}).get("command")} - {table["command"]})
        lines.append(f"{meta['topology']} ({meta['chips']} x {meta['device_kind']}, {meta['hbm_gib']:g} GiB HBM), "
                     f"{info['compute_dtype']}, {info['per_chip_batch']:g} images per chip, mesh {info['mesh']}, "
                     f"jax {meta['jax']}; compiled {', '.join(dates)}, one at a time; compile seconds are "
                     f"wall-clock on a 2-core host, {_aot_loads(configs)}. "
                     f"Source: {', '.join(f'`{c}`' for c in commands)}, benchmarks/results/aot_table.json.")
        if kind in PEAK_BY_KIND:
            flops, bandwidth = PEAK_BY_KIND[kind]
            lines.append(f"\nRoofline: max(FLOPs / {flops / 1e12:g} TFLOP/s, bytes / {bandwidth / 1e9:g} GB/s), "
                         f"a {kind} chip's peak bf16 rate and HBM bandwidth (`halluvit_jax.aot.PEAK_BY_KIND`): "
                         "the least time a step could take, not a prediction.")
    return "\n".join(lines).rstrip() + "\n"


def render_aot_finite(report: dict[str, Any]) -> str:
    """The train step compiled with the NaN guard per leaf (before) and from the step's norms
    (after): kernels, CPU and wall seconds, HBM bytes, and after/before (benchmarks/aot_finite_check.py)."""
    rows = {name: v["programs"]["train_step"] for name, v in report["variants"].items()}
    cpu = lambda p: p["lower_cpu_s"] + p["compile_cpu_s"]
    wall = lambda p: p["lower_s"] + p["compile_s"]
    cols = [("kernels (fusions)", lambda p: p["kernels"], "d"),
            ("CPU s (lowering + compile)", cpu, ".0f"),
            ("wall s", wall, ".0f"),
            ("CPU share of the wall time", lambda p: cpu(p) / wall(p), ".0%"),
            ("HBM MB accessed / step", lambda p: p["cost"]["bytes_accessed"] / 1e6, ".0f"),
            ("GFLOP / step", lambda p: p["cost"]["flops"] / 1e9, ".2f"),
            ("peak MiB", lambda p: p["memory"]["peak"] / 2**20, ".0f")]
    labels = {"per_leaf": "guard per leaf (before)", "from_norms": "guard from the norms (after)"}
    lines = ["| train step | " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, p in rows.items():
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(format(get(p), fmt) for _, get, fmt in cols) + " |")
    if {"per_leaf", "from_norms"} <= set(rows):
        before, after = rows["per_leaf"], rows["from_norms"]
        ratios = [f"{get(after) / get(before):.2f}x" if get(before) and "share" not in title else "-"
                  for title, get, _ in cols]
        lines.append("| after / before | " + " | ".join(ratios) + " |")
        lines += ["", f"The guard from the norms removes {before['kernels'] - after['kernels']} of the "
                      f"{before['kernels']} kernels ({1 - after['kernels'] / before['kernels']:.0%})."]
    s, m = report["settings"], report["machine"]
    loads = [m.get("load_average_start")] + [v.get("load_average_after") for v in report["variants"].values()]
    fmt_load = functools.partial(_load_avg, missing="?")
    lines += ["", f"`{s['config']}`, train step only, {s['topology']}, {s['per_chip_batch']} images per chip, "
                  f"{s['compute_dtype']}; jax {report['versions'].get('jax')}, libtpu "
                  f"{report['versions'].get('libtpu', '?')}; {report['date'][:10]}, commit {report['git_commit']}. "
                  f"Compiled one after the other on a shared {m['cores']}-core host under load (load average, "
                  f"1/5/15 min: {', '.join(fmt_load(x) for x in loads)} before the first compile and after each). "
                  f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def _threads(n: int) -> str:
    """deploy.py's ``--threads`` (0: onnxruntime's default) in words."""
    return "default threads" if not n else f"{n} intra-op thread{'s' if n != 1 else ''}"


def render_deploy(report: dict[str, Any]) -> str:
    """benchmarks/deploy.py's rows: medians of the interleaved rounds, hal/base (median of the
    per-round ratios), its share of the FLOP ideal, base/timm, logit errors and file sizes."""
    m, v, c = report["machine"], report["versions"], report["config"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "onnx", "jax2onnx", "jax", "torch", "timm")
                     if k in v)
    n = report.get("rounds_completed", c["rounds"])
    stopped = f" ({n} of the {c['rounds']} asked for: the run was stopped)" if n < c["rounds"] else ""
    out = [f"Host: {m['cpu']}, {m['cores']} cores, {_host_use(m)} (load average, 1/5/15 min: "
           f"{_loads(report)}, the later figures counting the benchmark's own threads; a load from other jobs near or above "
           f"the core count slows every variant and makes single rounds noisy); "
           f"{libs}; CPU execution provider, "
           f"{_threads(c['threads'])}; "
           f"{report['date'][:10]}, commit {report['git_commit']}. Each figure is the median of "
           + (f"the timed runs of passes over the variants of a model and batch, in turn, each pass "
              f"running every variant {c['warmup']} time{'s' if c['warmup'] != 1 else ''} untimed, then "
              f"{c['iters']} times timed, until each has {c['min_time']:g} s timed" if "min_time" in c else
              f"{c['iters']} timed runs after {c['warmup']} warm-up")
           + f", then the median of {n} interleaved "
           f"round{'s' if n != 1 else ''}{stopped} (every round runs every model and batch in turn); "
           f"hal/base and base/timm are medians of the per-round ratios.",
           f"Command: `{report['command']}`", ""]
    head = ["model", "graph", "batch", "base img/s", "hal img/s", "hal/base (rounds)", "FLOP ideal",
            "share of ideal", "timm img/s", "base/timm", "hal/timm"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    med = statistics.median
    for row in report["rows"]:
        ips = row["images_per_s_rounds"]
        for graph in ("", "_opt"):
            if "base" + graph not in ips:
                continue
            base, hal, timm = ips["base" + graph], ips["hal" + graph], ips.get("timm")
            ratios = [h / b for h, b in zip(hal, base)]
            speed = med(ratios)
            cells = [display_name(row["model"]), "optimized" if graph else "exported", str(row["batch"]),
                     _f(med(base), 1), _f(med(hal), 1), f"{_f(speed, 3)} ({_rounds(ratios, 3)})",
                     _f(row["flop_ideal"], 3), _f(speed / row["flop_ideal"])]
            if timm:
                cells += [_f(med(timm), 1), _f(med([b / t for b, t in zip(base, timm)])),
                          _f(med([h / t for h, t in zip(hal, timm)]))]
            else:
                cells += ["-", "-", "-"]
            out.append("| " + " | ".join(cells) + " |")
    out += ["", "| model | graph | max relative logit error vs JAX (base / hal) | file MiB (base / hal / timm) |",
            "|---|---|---|---|"]
    seen = set()
    for row in report["rows"]:  # one line per model: the files are the same at every batch
        if row["model"] in seen:
            continue
        seen.add(row["model"])
        err, size = row.get("max_rel_logit_error_vs_jax", {}), row["onnx_bytes"]
        for graph in ("", "_opt"):
            if "base" + graph not in size:
                continue
            errs = " / ".join(f"{err[k]:.1e}" if k in err else "-" for k in ("base" + graph, "hal" + graph))
            mib = " / ".join(_f(size[k] / 2**20, 1) if k in size else "-"
                             for k in ("base" + graph, "hal" + graph, "timm"))
            out.append(f"| {display_name(row['model'])} | {'optimized' if graph else 'exported'} | {errs} | {mib} |")
    return "\n".join(out) + "\n"


def render_ort_threads(report: dict[str, Any]) -> str:
    """benchmarks/ort_threads.py: each MatMul's median microseconds on 1 and 2 onnxruntime
    intra-op threads, and the speed-up of the second thread computed here."""
    m, v, c = report["machine"], report["versions"], report["config"]
    out = [f"Host: {m['cpu']}, {m['cores']} cores, {_host_use(m)} (load average, 1/5/15 min: "
           f"{_load_avg(m.get('load_average_start'))} at the start, {_load_avg(m.get('load_average_end'))} "
           f"at the end); onnxruntime {v.get('onnxruntime', '?')}, CPU execution provider, one "
           f"inter-op thread; {report['date'][:10]}, commit {report['git_commit']}. Each figure is "
           f"the median of {c['turns']} turns x {c['runs']} timed runs, a fresh session per case, "
           f"thread count and turn, one session alive at a time.",
           f"Command: `{report['command']}`", "",
           "| MatMul at batch 1 (DeiT-S) | A | B | 1 thread (us) | 2 threads (us) | speed-up |",
           "|---|---|---|---|---|---|"]
    for row in report["matmuls"]:
        one, two = row["us"]["1"], row["us"]["2"]
        b = "x".join(map(str, row["b"])) + (" (weight)" if row["b_constant"] else "")
        out.append(f"| {row['case']} | {'x'.join(map(str, row['a']))} | {b} | {one:.0f} | {two:.0f} | "
                   f"{_f(one / two)} |")
    return "\n".join(out) + "\n"


ATTENTION_CORES = (("mhsa_einsum", "MHSA einsums"), ("mhsa_dpa", "MHSA XLA dot_product_attention"),
                   ("mhsa_cudnn", "MHSA cuDNN"), ("hmhsa_plain", "hMHSA plain"),
                   ("hmhsa_shifts", "hMHSA shifts (accel before 4cb431d)"), ("hmhsa_xla", "hMHSA accel"),
                   ("hmhsa_triton", "hMHSA Triton (impl=pallas)"))
ATTENTION_SHAPES = {"deit_s": "DeiT-S (N = Nk = 197)", "pvt_b1_s1": "PVTv2-b1 stage 1 (3136 x 49)",
                    "pvt_b1_s2": "PVTv2-b1 stage 2 (784 x 49)",
                    "nextvit_s_s1": "NextViT-S stage 1 (784 x 49)"}


def render_attention_core_gpu(report: dict[str, Any]) -> str:
    """benchmarks/attention_core_gpu.py: ms per call of each core, per shape and pass, and the
    ratios accel / plain and accel / MHSA einsums computed here."""
    rows = {(r["shape"], r["core"], r["pass"]): r for r in report["rows"]}
    head = ["shape", "pass"] + [label + " ms" for _, label in ATTENTION_CORES] + [
        "plain / accel time", "accel / MHSA einsums time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shapes = list(dict.fromkeys(r["shape"] for r in report["rows"]))
    for shape in shapes:
        for pas in ("fwd", "fwd+bwd"):
            cells = [ATTENTION_SHAPES.get(shape, shape), pas]
            for core, _ in ATTENTION_CORES:
                r = rows.get((shape, core, pas))
                cells.append("-" if r is None else
                             f"refused ({r['error'].split(':')[0]})" if "error" in r else _f(r["ms"], 3))
            ms = {core: rows[(shape, core, pas)].get("ms") for core, _ in ATTENTION_CORES
                  if (shape, core, pas) in rows}
            ratio = lambda a, b: _f(a / b) + "x" if a and b else "-"  # noqa: E731
            cells += [ratio(ms.get("hmhsa_plain"), ms.get("hmhsa_xla")),
                      ratio(ms.get("hmhsa_xla"), ms.get("mhsa_einsum"))]
            lines.append("| " + " | ".join(cells) + " |")
    errors = sorted({r["error"] for r in report["rows"] if "error" in r})
    m, v, s = report["machine"], report["versions"], report["settings"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "jaxlib", "flax") if k in v)
    note = (f"\n{report['device']} ({report['platform']}), host {m['cpu']} with {m['cores']} cores, "
            f"{_host_use(m)} (load {_load_avg(m.get('load_average_start'))}); {libs}; "
            f"{report['date'][:10]}, commit {report['git_commit']}. One layer, batch {s['batch']}, "
            f"{s['dtype']}, inputs `[B, tokens, heads, d]`; each figure is the median of "
            f"{s['iters']} calls after {s['warmup']} warm-up. hMHSA is the ihh_chh variant.")
    if errors:
        note += " Refusals: " + "; ".join(f"`{e}`" for e in errors) + "."
    if report.get("note"):
        note += " " + report["note"]
    return "\n".join(lines) + "\n" + note + f"\nCommand: `{report['command']}`\n"


def render_triton_compile(report: dict[str, Any]) -> str:
    """benchmarks/triton_compile.py: per model, each distinct Triton kernel of ``impl='pallas'``
    compiled offline for each GPU target: launch grid, warps, shared memory against the SM's
    limit, registers per thread and spill bytes."""
    limits = report["shared_limit_bytes"]
    lines = ["| model | kernel | grid | warps | target | shared KiB | registers | spill stores / loads B |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        grid = " x ".join(str(g) for g in r["grid"] if g != 1) or "1"
        shared = _f(r["shared_bytes"] / 1024, 0) + ("" if r["fits"] else " (over the limit)")
        lines.append(f"| {display_name(r['model'])} | `{r['kernel']}` | {grid} | {r['num_warps']} | "
                     f"sm_{r['capability']} | {shared} | {r['registers']} | "
                     f"{r['spill_store_bytes']} / {r['spill_load_bytes']} |")
    v = report["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "jaxlib", "triton") if k in v)
    caps = ", ".join(f"sm_{c} {_f(b / 1024, 0)} KiB" for c, b in limits.items() if b)
    note = (f"\nShared memory per block at most: {caps}. Batch {report['batch']}, bfloat16; "
            f"compiled on {report['machine']['cpu']} (no GPU); {libs}; {report['date'][:10]}, "
            f"commit {report['git_commit']}. Each kernel is listed once per model, at its first "
            f"call; no kernel has run on a GPU.")
    return "\n".join(lines) + "\n" + note + f"\nCommand: `{report['command']}`\n"


RENDERERS = {
    "attention_core_gpu": render_attention_core_gpu,
    "triton_compile": render_triton_compile,
    "ci": render_ci,
    "machine": render_machine,
    "models": render_models,
    "speedups": render_speedups,
    "complexity": render_complexity,
    "onnx_ops": render_onnx_ops,
    "remat": render_remat,
    "complexity_full": render_complexity_full,
    "complexity_384": render_complexity_384,
    "complexity_paper": render_complexity_paper,
    "ablations": render_ablations,
    "ablation_directions": render_ablation_directions,
    "ablation_summary": render_ablation_summary,
    "parity": render_parity,
    "demo_train": render_demo_train,
    "demo_progress": render_demo_progress,
    "demo_runs": render_demo_runs,
    "demo_summary": render_demo_summary,
    "demo_ccs_summary": render_demo_ccs_summary,
    "demo_ccs": render_demo_ccs,
    "input_pipeline": render_input_pipeline,
    "input_pipeline_target": render_input_pipeline_target,
    "fast_decode": render_fast_decode,
    "aot": render_aot,
    "aot_finite": render_aot_finite,
    "deploy": render_deploy,
    "ort_threads": render_ort_threads,
}


def render_text(text: str, root: str = ROOT) -> str:
    """``text`` with every marked block regenerated from its JSON."""

    def block(match: re.Match) -> str:
        start, kind, path, _, end = match.groups()
        if kind not in RENDERERS:
            raise ValueError(f"unknown render kind {kind!r} (known: {sorted(RENDERERS)})")
        with open(os.path.join(root, path)) as f:
            data = json.load(f)
        return start + RENDERERS[kind](data) + end

    return MARKER.sub(block, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 when a committed table differs from its JSON")
    ap.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    stale = []
    for doc in _docs(args.root):
        path = os.path.join(args.root, doc)
        with open(path) as f:
            text = f.read()
        try:
            new = render_text(text, args.root)
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {doc}: {e}", file=sys.stderr)
            return 1
        if new == text:
            continue
        if args.check:
            stale.append(doc)
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       doc, doc + " (rendered)"))
        else:
            with open(path, "w") as f:
                f.write(new)
            print(f"rendered {doc}")
    if stale:
        print(f"error: {', '.join(stale)} differ from benchmarks/results/ "
              "(run python benchmarks/render_docs.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
