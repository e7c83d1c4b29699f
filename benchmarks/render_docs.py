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
- ``deploy``: onnxruntime images/s of each baseline, its hal twin and timm's torch.onnx graph,
  hal/base against the FLOP ideal, base/timm, logit errors and file sizes (benchmarks/deploy.py).

    python benchmarks/render_docs.py           # rewrite the tables in place
    python benchmarks/render_docs.py --check   # exit 1 when a committed table differs

tests/test_render_docs.py runs ``--check``.
"""

from __future__ import annotations

import argparse
import difflib
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


def _loads(report: dict[str, Any]) -> str:
    """The load averages (1, 5, 15 min) recorded before each round and at the end."""
    m = report["machine"]
    fmt = lambda load: "/".join(f"{v:.1f}" for v in load)
    before = [fmt(load) for load in m.get("load_average_before_each_round", []) if load]
    end = fmt(m["load_average_end"]) if m.get("load_average_end") else "not recorded"
    return f"{', '.join(before) or 'not recorded'} before the rounds, {end} at the end"


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
    return (f"Host: {m['cpu']}, {m['cores']} cores{accel}, shared with other sessions while it ran "
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


def render_deploy(report: dict[str, Any]) -> str:
    """benchmarks/deploy.py's rows: medians of the interleaved rounds, hal/base (median of the
    per-round ratios), its share of the FLOP ideal, base/timm, logit errors and file sizes."""
    m, v, c = report["machine"], report["versions"], report["config"]
    fmt = lambda load: "/".join(f"{x:.1f}" for x in load)  # noqa: E731
    loads = ", ".join(fmt(load) for load in m.get("load_average_before_each_round", []) if load)
    libs = ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "onnx", "jax2onnx", "jax", "torch", "timm")
                     if k in v)
    n = report.get("rounds_completed", c["rounds"])
    stopped = f" ({n} of the {c['rounds']} asked for: the run was stopped)" if n < c["rounds"] else ""
    out = [f"Host: {m['cpu']}, {m['cores']} cores, shared with other jobs while it ran (load average, "
           f"1/5/15 min: {loads or 'not recorded'} before the rounds, "
           f"{fmt(m['load_average_end']) if m.get('load_average_end') else 'not recorded'} at the end; "
           f"a load near or above the core count slows every variant and makes single rounds noisy); "
           f"{libs}; CPU execution provider, "
           f"{'default threads' if not c['threads'] else str(c['threads']) + ' threads'}; "
           f"{report['date'][:10]}, commit {report['git_commit']}. Each figure is the median of "
           f"{c['iters']} timed runs after {c['warmup']} warm-up, then the median of {n} interleaved "
           f"round{'s' if n != 1 else ''}{stopped} (every round runs every model, batch and variant in turn); "
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


RENDERERS = {"machine": render_machine, "models": render_models, "speedups": render_speedups,
             "complexity": render_complexity, "onnx_ops": render_onnx_ops,
             "deploy": render_deploy}


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
