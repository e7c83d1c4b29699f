"""What every benchmark's ``--json`` records besides its measurements: the machine (CPU model,
cores, load average), the versions of the libraries used, the date, the commit and the exact
command, so that a committed result says where and how it was measured."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("jax", "jaxlib", "flax", "optax", "numpy")


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages (empty where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "system": platform.platform(),
            "load_average_start": loadavg()}


def versions(extra=()) -> dict[str, str]:
    """Installed versions of the core JAX stack and of ``extra`` (those not installed left out)."""
    out = {"python": platform.python_version()}
    for name in (*CORE, *extra):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    """The checkout's commit; ``HALLUVIT_GIT_COMMIT`` where set, for a copy of the work tree
    whose ``.git`` is not the checkout's (the lent GPU host gets such a copy)."""
    if os.environ.get("HALLUVIT_GIT_COMMIT"):
        return os.environ["HALLUVIT_GIT_COMMIT"]
    try:
        proc = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False)
    except OSError:  # no git on this host
        return ""
    return proc.stdout.strip()


def command(script: str, argv=None) -> str:
    """The command line as run from the repository root."""
    rel = os.path.relpath(os.path.abspath(script), ROOT)
    return shlex.join(["python", rel] + list(sys.argv[1:] if argv is None else argv))


def header(benchmark: str, script: str, argv=None, extra=()) -> dict[str, Any]:
    return {"benchmark": benchmark, "command": command(script, argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git_commit": git_commit(),
            "machine": machine(), "versions": versions(extra)}


def write_json(path: str, report: dict[str, Any]) -> None:
    """Write ``report`` atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
