"""Preemption and exact resume, through the real command line (`python train.py ...`).

* SIGKILL at a random step after a checkpoint, then resume: the final train state (parameters,
  BatchNorm statistics, optimizer state) is bitwise equal to an uninterrupted run's.
* SIGTERM mid-run: the process saves a checkpoint, exits with status 0, and the next run resumes.
* A non-finite loss stops the run with its step number and keeps the last good checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import data_fixtures as dfx
import numpy as np
import pytest
from test_train_common import (
    REPO,
    assert_trees_bitwise_equal,
    final_state,
    read_metrics,
    run_train,
    subprocess_env,
    tiny_demo_config,
    train_cmd,
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return dfx.prepared_demo(tmp_path_factory)


def _finalized_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # ~30 s of subprocesses; the fast tier resumes bitwise in-process (test_train_reliability.py)
def test_sigkill_then_resume_is_bitwise_identical(demo_dir, tmp_path):
    steps = ["--config.total_steps=24"]
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    env = subprocess_env()
    # The uninterrupted reference runs alongside the run that gets killed.
    ref = subprocess.Popen(train_cmd(demo_dir, ref_dir, *steps), env=env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(train_cmd(demo_dir, run_dir, *steps), env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    _wait_for(lambda: _finalized_steps(run_dir), victim, 240, "the first checkpoint")
    time.sleep(random.uniform(0.0, 0.3))
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = _finalized_steps(run_dir)
    assert killed_at and max(killed_at) < 24

    proc = run_train(demo_dir, run_dir, *steps)
    assert re.search(rf"Resuming from .* step {max(killed_at)}\b", proc.stdout), proc.stdout[-2000:]
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]

    ref_step, ref_state = final_state(ref_dir)
    run_step, run_state = final_state(run_dir)
    assert ref_step == run_step == 24
    assert_trees_bitwise_equal(ref_state, run_state)
    # The metrics of the steps after the resume point agree too (same data, same RNG).
    ref_loss = {m["step"]: m["train/loss"] for m in read_metrics(ref_dir) if "train/loss" in m}
    run_loss = {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}
    for step in range(max(killed_at) + 1, 25):
        assert run_loss[step] == ref_loss[step], step


@pytest.mark.slow  # ~30 s: two subprocess runs
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(demo_dir, tmp_path):
    workdir = str(tmp_path / "run")
    cmd = train_cmd(demo_dir, workdir, "--config.total_steps=100000", "--config.checkpoint_every_steps=1000")
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    _wait_for(lambda: os.path.exists(metrics) and len(read_metrics(workdir)) >= 2, proc, 240, "2 steps")
    assert not _finalized_steps(workdir)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "Preempted at step" in out
    saved = _finalized_steps(workdir)
    assert len(saved) == 1 and 2 <= saved[0] < 1000
    s = saved[0]
    resumed = run_train(demo_dir, workdir, f"--config.total_steps={s + 2}", "--config.checkpoint_every_steps=1000")
    assert re.search(rf"Resuming from .* step {s}\b", resumed.stdout)
    step, state = final_state(workdir)
    assert step == s + 2 and int(state["step"]) == s + 2
    logged = [m["step"] for m in read_metrics(workdir) if "train/loss" in m]
    assert logged[-2:] == [s + 1, s + 2]


@pytest.mark.slow  # two in-process compiles (~45 s on 2 busy cores)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_dir, tmp_path):
    from halluvit_jax.train import train_and_evaluate

    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_demo_config(demo_dir, total_steps=3, checkpoint_every_steps=3,
                                        **{"mesh.num_devices": 2}), workdir)
    good_step, good = final_state(workdir)
    assert good_step == 3
    bad = tiny_demo_config(demo_dir, total_steps=8, checkpoint_every_steps=1, **{"mesh.num_devices": 2})
    bad.optim.lr = float("nan")
    with pytest.raises(FloatingPointError, match=r"^Non-finite .* at step 4\b.*the last finite checkpoint is step 3\b"):
        train_and_evaluate(bad, workdir)
    step, state = final_state(workdir)
    assert step == 3
    assert all(np.isfinite(x).all() for x in __import__("jax").tree_util.tree_leaves(state["params"]))
    assert_trees_bitwise_equal(good["params"], state["params"])
