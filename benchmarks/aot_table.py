r"""Base vs hal on a TPU slice, by XLA:TPU's own estimate: the figures of docs/aot.md's table.

    python benchmarks/aot_table.py run [--families deit_s,pvt_v2_b1,nextvit_s] [--topology v5e:2x2]

``run`` compiles each family's baseline and hal config with ``python -m halluvit_jax.aot``
(train step and deploy forward, ``--per_chip_batch 128``, bf16; needs libtpu), one at a time,
and merges each report into ``benchmarks/results/aot_table.json`` under ``configs``, with the
date, commit and load average of its compile (a config already there is kept unless
``--force``; a compile past ``--timeout`` is recorded as such). benchmarks/render_docs.py
renders the table from that file (kind ``aot``).

``run --impl NAME`` compiles only the hal configs, with ``--config.model.impl=NAME`` (e.g.
``pallas``, the opt-in kernel that ``auto`` does not pick), stored as ``{family}_hal@NAME``;
the table shows them as extra rows against the same baseline. ``run --hal_only`` compiles only
the hal configs with the default impl, as after a change to the hal layers. ``--model_flag
FIELD=V`` (repeatable; with ``--impl``) adds ``--config.model.FIELD=V`` to those compiles, stored
as ``{family}_hal@NAME,FIELD=V``: an ablation row, e.g. ``--impl pallas --model_flag
hal.cffn=False``, the hal model without its cFFNs, which splits the hal/base bytes between
hMHSA and cFFN.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_info  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
OUT = os.path.join(RESULTS, "aot_table.json")
FAMILIES = ("deit_s", "pvt_v2_b1", "nextvit_s")


def load_table(path: str = OUT) -> dict:
    if not os.path.isfile(path):
        return {"configs": {}}
    with open(path) as f:
        return json.load(f)


def merge_report(old: dict, new: dict) -> dict:
    """``new`` over ``old`` (one config's reports), keeping the programs of an earlier run that
    ``new`` lacks (``--step train`` then ``--step deploy`` fill one entry)."""
    programs = {**old.get("programs", {}), **new.get("programs", {})}
    timed_out = {**old.get("timed_out_s", {}), **new.get("timed_out_s", {})}
    for name in new.get("programs", {}):
        timed_out.pop(name, None)
    merged = {**old, **new, "programs": programs}
    if timed_out:
        merged["timed_out_s"] = timed_out
    else:
        merged.pop("timed_out_s", None)
    return merged


def _save(table: dict, config: str, new: dict, argv: list[str] | None, load_start: list[float]) -> None:
    new = {**new, "measured": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git_commit": run_info.git_commit(),
                               "command": run_info.command(__file__, argv),
                               "load_average_start": load_start, "load_average_end": run_info.loadavg()}}
    table["configs"][config] = merge_report(table["configs"].get(config, {}), new)
    table.update(run_info.header("aot_table", __file__, argv, extra=("libtpu",)))
    run_info.write_json(OUT, table)


def run(families: list[str], topology: str, per_chip_batch: int, timeout: int, force: bool, step: str,
        extra: list[str], argv: list[str] | None = None, impl: str | None = None,
        hal_only: bool = False, model_flags: list[str] | None = None) -> None:
    model_flags = list(model_flags or [])
    os.makedirs(RESULTS, exist_ok=True)
    wanted = {"both": ["train_step", "deploy_forward"], "train": ["train_step"], "deploy": ["deploy_forward"]}[step]
    table = load_table()
    # each compile's report goes to a private directory, not beside the table: a row key
    # holds "@" and "," under --impl / --model_flag
    scratch = tempfile.TemporaryDirectory(prefix="aot_table_")
    for family in families:
        names = [f"{family}_hal@{','.join([impl, *model_flags])}"] if impl else [f"{family}_hal"] if hal_only else [family, f"{family}_hal"]
        for name in names:
            config = name.split("@")[0]
            flags = [f"--config.model.{f}" for f in ([f"impl={impl}"] if impl else []) + model_flags]
            have = table["configs"].get(name, {}).get("programs", {})
            if all(p in have for p in wanted) and not force:
                print(f"{OUT} has {name}'s {', '.join(wanted)} (--force recompiles)", flush=True)
                continue
            tmp = os.path.join(scratch.name, "report.json")  # merged into the table by _save
            cmd = [sys.executable, "-m", "halluvit_jax.aot", "--config", f"configs/{config}.py", "--topology", topology,
                   "--per_chip_batch", str(per_chip_batch), "--config.compute_dtype=bfloat16", "--step", step,
                   "--json", tmp, *flags, *extra]
            print(" ".join(cmd[1:]), flush=True)
            t0, load_start = time.perf_counter(), run_info.loadavg()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                _save(table, name, {"config": f"configs/{config}.py", "topology": topology,
                                      "timed_out_s": {p: timeout for p in wanted if p not in have}}, argv,
                      load_start)
                print(f"  timed out after {timeout} s", flush=True)
                continue
            print(proc.stdout + proc.stderr[-2000:], f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if os.path.isfile(tmp):
                with open(tmp) as f:
                    new = json.load(f)
                os.remove(tmp)
                _save(table, name, new, argv, load_start)


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
    p_run.add_argument("--impl", default=None, help="compile only the hal configs, with this model.impl")
    p_run.add_argument("--model_flag", action="append", default=[], metavar="FIELD=V",
                       help="with --impl: also pass --config.model.FIELD=V (an ablation row of its own)")
    p_run.add_argument("--hal_only", action="store_true",
                       help="compile only the hal configs (default impl): after a change to the hal layers")
    args, extra = parser.parse_known_args(argv)
    families = [f for f in args.families.split(",") if f]
    bad = [f for f in args.model_flag if "=" not in f or f.startswith("-")]
    if bad:
        parser.error(f"--model_flag {bad[0]!r} is not FIELD=V (e.g. hal.cffn=False)")
    if args.model_flag and not args.impl:
        parser.error("--model_flag needs --impl: the row is stored as {family}_hal@IMPL,FIELD=V "
                     "(--impl auto for the default path)")
    run(families, args.topology, args.per_chip_batch, args.timeout, args.force, args.step, extra, argv, args.impl,
        args.hal_only, args.model_flag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
