r"""Base vs hal on a TPU slice, by XLA:TPU's own estimate: the table of docs/aot.md.

    python benchmarks/aot_table.py run [--families deit_s,pvt_v2_b1,nextvit_s] [--topology v5e:2x2]
    python benchmarks/aot_table.py render [--write docs/aot.md]

``run`` compiles each family's baseline and hal config with ``python -m halluvit_jax.aot``
(train step and deploy forward, ``--per_chip_batch 128``, bf16; needs libtpu), one at a time,
each writing ``benchmarks/results/aot_<config>.json`` (existing files are kept unless
``--force``; a compile past ``--timeout`` is recorded as such). ``render`` prints the markdown
table from those files, or replaces the table between the ``aot-table`` markers of a file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
FAMILIES = {"deit_s": "DeiT-S", "pvt_v2_b1": "PVTv2-b1", "nextvit_s": "NextViT-S"}
START, END = "<!-- aot-table:start -->", "<!-- aot-table:end -->"


def result_path(config: str) -> str:
    return os.path.join(RESULTS, f"aot_{config}.json")


def _merge(out: str, new: dict) -> None:
    """Writes ``new`` into ``out``, keeping the programs of an earlier run that ``new`` lacks
    (``--step train`` then ``--step deploy`` fill one file)."""
    old = {}
    if os.path.isfile(out):
        with open(out) as f:
            old = json.load(f)
    programs = {**old.get("programs", {}), **new.get("programs", {})}
    timed_out = {**old.get("timed_out_s", {}), **new.get("timed_out_s", {})}
    for name in new.get("programs", {}):
        timed_out.pop(name, None)
    merged = {**old, **new, "programs": programs}
    if timed_out:
        merged["timed_out_s"] = timed_out
    else:
        merged.pop("timed_out_s", None)
    with open(out, "w") as f:
        json.dump(merged, f, indent=2, sort_keys=True)
        f.write("\n")


def run(families: list[str], topology: str, per_chip_batch: int, timeout: int, force: bool, step: str,
        extra: list[str]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    wanted = {"both": ["train_step", "deploy_forward"], "train": ["train_step"], "deploy": ["deploy_forward"]}[step]
    for family in families:
        for config in (family, f"{family}_hal"):
            out = result_path(config)
            have = (_load(config) or {}).get("programs", {})
            if all(p in have for p in wanted) and not force:
                print(f"{out} has {', '.join(wanted)} (--force recompiles)", flush=True)
                continue
            tmp = out + ".new"
            cmd = [sys.executable, "-m", "halluvit_jax.aot", "--config", f"configs/{config}.py", "--topology", topology,
                   "--per_chip_batch", str(per_chip_batch), "--config.compute_dtype=bfloat16", "--step", step,
                   "--json", tmp, *extra]
            print(" ".join(cmd[1:]), flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                _merge(out, {"config": f"configs/{config}.py", "topology": topology,
                             "timed_out_s": {p: timeout for p in wanted if p not in have}})
                print(f"  timed out after {timeout} s", flush=True)
                continue
            print(proc.stdout + proc.stderr[-2000:], f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if os.path.isfile(tmp):
                with open(tmp) as f:
                    new = json.load(f)
                os.remove(tmp)
                _merge(out, new)


def _load(config: str) -> dict | None:
    path = result_path(config)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _prog(rep: dict | None, name: str) -> dict | None:
    return None if rep is None else rep.get("programs", {}).get(name)


def _pair(base: dict | None, hal: dict | None, get, fmt: str) -> str:
    a = get(base) if base else None
    b = get(hal) if hal else None
    if a is None and b is None:
        return "not compiled"
    sa = "?" if a is None else format(a, fmt)
    sb = "?" if b is None else format(b, fmt)
    ratio = f" ({b / a:.2f}x)" if a and b else ""
    return f"{sa} -> {sb}{ratio}"


def render(families: list[str]) -> str:
    lines = []
    for program, title in (("deploy_forward", "Deploy forward"), ("train_step", "Train step")):
        lines += [f"**{title}**, per chip:", "",
                  "| model | TFLOPs base -> hal | HBM GB accessed base -> hal | peak GiB base -> hal | compile s base / hal |",
                  "|---|---|---|---|---|"]
        for family in families:
            base_rep, hal_rep = _load(family), _load(f"{family}_hal")
            base, hal = _prog(base_rep, program), _prog(hal_rep, program)

            def secs(p, rep):
                if p:
                    return f"{p['compile_s']:.0f}"
                if rep and program in rep.get("timed_out_s", {}):
                    return f"> {rep['timed_out_s'][program]}"
                return "-"

            lines.append(
                f"| {FAMILIES.get(family, family)} "
                f"| {_pair(base, hal, lambda p: p['cost']['flops'] / 1e12, '.3f')} "
                f"| {_pair(base, hal, lambda p: p['cost']['bytes_accessed'] / 1e9, '.2f')} "
                f"| {_pair(base, hal, lambda p: p['memory']['peak'] / 2**30, '.2f')} "
                f"| {secs(base, base_rep)} / {secs(hal, hal_rep)} |")
        lines.append("")
    meta = next((r for r in (_load(c) for f in families for c in (f, f"{f}_hal")) if r and r.get("info")), None)
    if meta:
        info = meta["info"]
        lines.append(f"{meta['topology']} ({meta['chips']} x {meta['device_kind']}, {meta['hbm_gib']:g} GiB HBM), "
                     f"{info['compute_dtype']}, {info['per_chip_batch']:g} images per chip, mesh {info['mesh']}, "
                     f"jax {meta['jax']}; compile seconds on a shared 2-core host (other jobs running). "
                     "Source: `python benchmarks/aot_table.py run`, benchmarks/results/aot_*.json.")
    return "\n".join(lines).rstrip() + "\n"


def write_into(path: str, table: str) -> None:
    with open(path) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"error: {path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{START}\n{table}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="compile base and hal of each family (needs libtpu)")
    p_run.add_argument("--families", default=",".join(FAMILIES))
    p_run.add_argument("--topology", default="v5e:2x2")
    p_run.add_argument("--per_chip_batch", type=int, default=128)
    p_run.add_argument("--timeout", type=int, default=1800, help="seconds per config")
    p_run.add_argument("--force", action="store_true")
    p_run.add_argument("--step", choices=["both", "train", "deploy"], default="both")
    p_render = sub.add_parser("render", help="the markdown table from benchmarks/results/aot_*.json")
    p_render.add_argument("--families", default=",".join(FAMILIES))
    p_render.add_argument("--write", metavar="FILE", help="replace the table between the aot-table markers of FILE")
    args, extra = parser.parse_known_args(argv)
    families = [f for f in args.families.split(",") if f]
    if args.cmd == "run":
        run(families, args.topology, args.per_chip_batch, args.timeout, args.force, args.step, extra)
        return 0
    table = render(families)
    if args.write:
        write_into(args.write, table)
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
