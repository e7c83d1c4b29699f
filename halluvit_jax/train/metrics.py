"""Metric writers (JSON lines + TensorBoard via tensorboardX, process 0 only) and the progress line."""

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
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
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
