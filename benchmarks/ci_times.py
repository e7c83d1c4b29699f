"""Read the log of one ``.ci/run`` and write its figures to JSON, for the docs to render.

README.md and docs/testing.md quote how long CI's two test tiers took and how many tests each
ran. Those figures come from the log ``.ci/run`` prints, not from memory::

    d=$(mktemp -d) && git clone -q . "$d" && (cd "$d" && CI=true bash .ci/run) 2>&1 | tee ci.log
    python benchmarks/ci_times.py ci.log --json benchmarks/results/ci.json
    python benchmarks/render_docs.py

What is read: the ``CI: commit ...`` line (commit, date, CPUs, load average at the start), each
tier's pytest summary (``N passed, M skipped ... in S s``), each tier's ``CI: NAME tier: exit
R, wall time XmYYs`` line, and the whole job's wall time with the load average at the end. A log
from before ``.ci/run`` printed the first and last of these takes ``--commit`` and ``--date``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_info  # noqa: E402

START = re.compile(r"^CI: commit (\S+), (.+? UTC), (\d+) CPUs, load average ([\d. ]+|unknown)$")
TIER_CMD = re.compile(r"^CI: tier '(\w+)': (.*)$")
SUMMARY = re.compile(r"^=+ (.*?) in ([\d.]+)s(?: \([\d:]+\))? =+$")
TIER_END = re.compile(r"^CI: (\w+) +tier: exit (\d+), wall time (\d+)m(\d+)s$")
JOB_END = re.compile(r"^CI: whole job \(install included\): wall time (\d+)m(\d+)s, load average at the end ([\d. ]+|unknown)$")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")


def _load(text: str) -> list[float]:
    return [] if text == "unknown" else [float(v) for v in text.split()]


def parse_log(text: str) -> dict[str, Any]:
    """The tiers, the commit and the times that one ``.ci/run`` log records."""
    out: dict[str, Any] = {"tiers": {}}
    current = None
    for line in text.splitlines():
        line = line.rstrip()
        if m := START.match(line):
            out.update(commit=m[1], date=m[2], cpus=int(m[3]), load_average_start=_load(m[4]))
        elif m := TIER_CMD.match(line):
            current = m[1]
            out["tiers"][current] = {"command": m[2]}
        elif (m := SUMMARY.match(line)) and current is not None:
            counts = {kind.rstrip("s") if kind.startswith(("error", "warning")) else kind: int(n)
                      for n, kind in COUNT.findall(m[1])}
            out["tiers"][current].update(counts=counts, pytest_seconds=float(m[2]))
        elif m := TIER_END.match(line):
            tier = out["tiers"].setdefault(m[1], {})
            tier.update(exit=int(m[2]), wall_seconds=int(m[3]) * 60 + int(m[4]))
        elif m := JOB_END.match(line):
            out.update(job_wall_seconds=int(m[1]) * 60 + int(m[2]), load_average_end=_load(m[3]))
    missing = [name for name in ("fast", "slow")
               if name not in out["tiers"] or "wall_seconds" not in out["tiers"][name]]
    if missing:
        raise ValueError(f"the log has no finished {' or '.join(missing)} tier: "
                         "pass the full output of .ci/run")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", help="what .ci/run printed (stdout and stderr)")
    ap.add_argument("--json", required=True, help="write the figures here")
    ap.add_argument("--commit", default=None, help="for a log without the 'CI: commit' line")
    ap.add_argument("--date", default=None, help="for a log without the 'CI: commit' line")
    ap.add_argument("--job-seconds", type=int, default=None,
                    help="the whole job's wall time, for a log without its last line")
    args = ap.parse_args(argv)
    try:
        with open(args.log, errors="replace") as f:
            ci = parse_log(f.read())
    except (OSError, ValueError) as e:
        print(f"error: {args.log}: {e}", file=sys.stderr)
        return 1
    for key, value in (("commit", args.commit), ("date", args.date), ("job_wall_seconds", args.job_seconds)):
        if value is not None:
            ci[key] = value
    report = run_info.header("ci_times", __file__, argv)
    report["ci"] = ci
    run_info.write_json(args.json, report)
    fast, slow = ci["tiers"]["fast"], ci["tiers"]["slow"]
    print(f"fast tier {fast['wall_seconds']} s, slow tier {slow['wall_seconds']} s -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
