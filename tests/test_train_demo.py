"""The README's main command, `python train.py --config configs/demo.py`, on the embedded digits.

CI runs the short `configs/demo.py:ci` variant and evaluates its checkpoint with
`python -m halluvit_jax.evaluate` in deploy form (cFFN folded). The full run (>= 95% top-1 within
10 minutes on 2 CPU cores) is the `slow` benchmark: `pytest -m slow tests/test_train_demo.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import data_fixtures as dfx
import pytest
from test_train_common import CONFIGS, REPO, read_metrics, subprocess_env


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return dfx.prepared_demo(tmp_path_factory)


def _train(config_arg: str, workdir: str, timeout: float) -> float:
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "train.py", f"--config={os.path.join(CONFIGS, 'demo.py')}:{config_arg}",
         f"--workdir={workdir}"],
        env=subprocess_env(num_devices=1), cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "img/s" in proc.stdout and "ETA" in proc.stdout  # the progress line
    return time.time() - t0


@pytest.mark.slow  # 60 s: 10 epochs in a subprocess; the full demo run is slow too
def test_demo_ci_learns_and_its_checkpoint_evaluates_in_deploy_form(demo_dir, tmp_path):
    workdir = str(tmp_path / "demo")
    _train(f"ci,data_dir={demo_dir}", workdir, timeout=600)
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    # 10 classes: chance is 10%; the short run (10 epochs) must be far above it.
    assert final["eval/top1"] >= 0.5, final
    assert os.path.isfile(os.path.join(workdir, "config.json"))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(workdir, "tb")))
    assert [m for m in read_metrics(workdir) if "train/images_per_sec" in m]

    out = subprocess.run(
        [sys.executable, "-m", "halluvit_jax.evaluate", f"--config={os.path.join(CONFIGS, 'demo.py')}:data_dir={demo_dir}",
         f"--checkpoint={workdir}", "--deploy"],
        env=subprocess_env(num_devices=1), cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["deploy"] is True and result["count"] == 297
    # The folded (deploy) model classifies like the training-form model evaluated by the trainer.
    assert abs(result["top1"] - final["eval/top1"]) <= 1 / 297 + 1e-9
    assert result["loss"] == pytest.approx(final["eval/loss"], rel=1e-3)


@pytest.mark.slow
def test_demo_full_reaches_95_percent_within_10_minutes(demo_dir, tmp_path):
    workdir = str(tmp_path / "demo")
    seconds = _train(f"data_dir={demo_dir}", workdir, timeout=900)
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    print(f"demo: top1 {final['eval/top1']:.4f} in {seconds:.0f} s")
    assert final["eval/top1"] >= 0.95, final
    assert seconds <= 600, seconds
