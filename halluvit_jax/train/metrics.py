"""The files a run's metrics live in, and the progress line.

``WORKDIR/metrics.jsonl`` (one JSON row per logged step) and TensorBoard events in ``WORKDIR/tb``
(:class:`MetricWriter`, process 0 only); ``WORKDIR/final_metrics.json`` of a finished run;
:func:`truncate_metrics` keeps one row per step across resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

logger = logging.getLogger("halluvit_jax.train")


class MetricWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard events in ``workdir/tb``.

    Only process 0 writes; the other processes get a no-op writer, so the caller never branches.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, METRICS_NAME), "a", buffering=1)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # pragma: no cover - optional dependency
                logger.warning("tensorboardX is not installed; writing JSON lines only.")

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, int(step))

    def write_text(self, tag: str, text: str) -> None:
        if self.active and self._tb is not None:
            self._tb.add_text(tag, text, 0)

    def flush(self) -> None:
        if self.active:
            self._jsonl.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
            self.active = False


class Progress:
    """Step / loss / lr / images per second / ETA, measured between two log calls.

    :meth:`start` marks the first step whose result is ready (after compilation); rates and the
    ETA come from steps after it, so compile time never inflates the ETA.
    """

    def __init__(self, total_steps: int, global_batch_size: int, start_step: int):
        self.total_steps = total_steps
        self.batch = global_batch_size
        self._t0 = time.perf_counter()
        self._s0 = start_step
        self._started = False

    def start(self, step: int) -> None:
        self._t0, self._s0, self._started = time.perf_counter(), step, True

    def line(self, step: int, scalars: Mapping[str, float]) -> tuple[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        steps = step - self._s0
        parts = [f"step {step}/{self.total_steps}"]
        for k, v in scalars.items():
            parts.append(f"{k} {v:.4g}")
        if steps > 0 and self._started:
            img_s = steps * self.batch / dt
            eta = (self.total_steps - step) * dt / steps
            parts.append(f"{img_s:.1f} img/s")
            parts.append(f"ETA {_hms(eta)}")
            self._t0, self._s0 = now, step
        else:  # only the compiling first step so far
            img_s = float("nan")
            parts.append("compiled")
        return " | ".join(parts), img_s


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


METRICS_NAME = "metrics.jsonl"
FINAL_METRICS_NAME = "final_metrics.json"


def truncate_metrics(workdir: str, step: int) -> None:
    """Drops rows of ``metrics.jsonl`` past ``step`` (written after the checkpoint a run resumes
    from), so that every logged step has exactly one row after any number of resumes."""
    path = os.path.join(workdir, METRICS_NAME)
    if jax.process_index() != 0 or not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a row cut by a kill
            continue
        if int(row.get("step", 0)) <= step:
            keep.append(json.dumps(row) + "\n")
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def write_final_metrics(workdir: str, step: int, results: Mapping[str, Any]) -> None:
    """``final_metrics.json`` of a finished run: its step and last evaluation (process 0)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, FINAL_METRICS_NAME), "w") as f:
            json.dump({"step": step, **results}, f, indent=2)


def final_metrics(workdir: str) -> dict[str, Any]:
    """What a finished run recorded last: ``final_metrics.json``, or, when it holds no
    evaluation (a run without eval), the train loss and epoch of the last ``metrics.jsonl`` row."""
    final: dict[str, Any] = {}
    path = os.path.join(workdir, FINAL_METRICS_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            final = json.load(f)
    if len(final) <= 1 and os.path.isfile(os.path.join(workdir, METRICS_NAME)):
        with open(os.path.join(workdir, METRICS_NAME)) as f:
            rows = [json.loads(line) for line in f if '"train/loss"' in line]
        final = {k: v for k, v in (rows[-1] if rows else {}).items() if k in ("train/loss", "train/epoch")}
    return final
