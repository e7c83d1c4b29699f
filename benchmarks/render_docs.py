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
- ``input_pipeline``, ``input_pipeline_target``, ``fast_decode``: the CPU-ms per image of each
  preprocessing chain and decoder back-end, tf.data's chains and the ratios to them, the grain
  pipeline's img/s, the verdict on the tf.data target, and the ``fast`` JPEG decoding's error and
  saving (benchmarks/input_pipeline.py, docs/data.md).

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


# --- benchmarks/input_pipeline.py (docs/data.md) -------------------------------------------


def _ip_load(report: dict[str, Any]) -> str:
    fmt = lambda load: "/".join(f"{v:.1f}" for v in load) if load else "not recorded"
    return (f"load average (1/5/15 min) {fmt(report['machine'].get('load_average_start'))} at the "
            f"start, {fmt(report.get('load_average_end'))} at the end")


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


def render_input_pipeline(report: dict[str, Any]) -> str:
    """The whole benchmark: host, load and versions; CPU-ms/img of every chain and back-end;
    tf.data's chains and each of our chains over its tf.data twin; the grain pipeline."""
    m, v, s, d = report["machine"], report["versions"], report["settings"], report["dataset"]
    ours, tf = _ip_medians(report)
    backends = report.get("backends") or list(next(iter(ours.values())))
    libs = ", ".join(f"{k} {v[k]}" for k in ("opencv-python-headless", "simplejpeg", "turbojpeg",
                                             "tensorflow", "tensorflow-cpu", "grain", "jax") if k in v)
    out = [f"Host: {m['cpu']}, {m['cores']} cores, shared with other sessions while it ran "
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


RENDERERS = {"machine": render_machine, "models": render_models, "speedups": render_speedups,
             "complexity": render_complexity, "onnx_ops": render_onnx_ops,
             "input_pipeline": render_input_pipeline,
             "input_pipeline_target": render_input_pipeline_target,
             "fast_decode": render_fast_decode}


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
