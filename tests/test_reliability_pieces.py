"""Each reliability piece alone, through the public entry points (``train.py``'s ``main``,
``halluvit_jax.load``, ``python -m halluvit_jax.evaluate``), with the behaviour docs/training.md
documents (issue 22):

* a checkpoint whose optimizer state (only) holds a NaN: resuming from it is refused in one line
  naming the step and the leaf;
* a non-finite gradient norm with a finite loss at run time (a final-norm scale of 1e25: logits
  ~1e22 give a finite cross entropy, their ~1e25 head gradients overflow the norm's sum of
  squares; with clipping every other value stays finite): the guard stops the run in one line
  ``Non-finite gradient (loss L, grad norm G) at step N`` and nothing is saved;
* a truncated and a byte-flipped array file in the newest step: resume skips the step (kept as
  ``<step>.unreadable``) and resumes from the newest intact one, bitwise as the uninterrupted
  run; ``halluvit_jax.load`` and ``evaluate`` refuse with one line naming the intact step.

The checkpoints are damaged with orbax itself (re-saving a step's ``state`` item with one edited
leaf) or by editing one file's bytes; the tiny demo run of tests/test_train_reliability.py.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil

import data_fixtures as dfx
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_cli_errors import one_error_line, train_main
from test_train_reliability import tiny_argv

import halluvit_jax as hv
from halluvit_jax.checkpoint import CheckpointError
from halluvit_jax.checkpoint.io import CHECKSUMS_KEY
from halluvit_jax.checkpoint.trees import value_checksums


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return dfx.prepared_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def run4(demo_dir, tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4 (not to be modified: tests copy it)."""
    wd = str(tmp_path_factory.mktemp("pieces") / "run")
    assert train_main(tiny_argv(demo_dir, wd)) == 0
    return wd


def _copy(run4: str, dst) -> str:
    dst = str(dst)
    shutil.copytree(run4, dst)
    return dst


def _steps(workdir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _rewrite_state(workdir: str, step: int, edit) -> None:
    """Re-saves step ``step``'s ``state`` item with orbax after ``edit(tree)`` changed it in place,
    and the checksums of its values in the step's ``meta`` (what a writer without the non-finite
    guard would have produced: a consistent checkpoint of these values)."""
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    path = os.path.join(step_dir, "state")
    tree = jax.tree.map(np.array, ocp.PyTreeCheckpointer().restore(path))
    edit(tree)
    ocp.PyTreeCheckpointer().save(path + ".new", tree)
    shutil.rmtree(path)
    os.rename(path + ".new", path)
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)
    assert CHECKSUMS_KEY in meta
    meta[CHECKSUMS_KEY] = value_checksums(tree)
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        json.dump(meta, f)


def _assert_variables_bitwise_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


# ---------------------------------------------------------------------------------------------
# Non-finite values.


def test_resume_refuses_a_checkpoint_whose_optimizer_state_is_not_finite(run4, demo_dir, tmp_path, capsys):
    wd = _copy(run4, tmp_path / "run")

    def poison(tree):
        tree["opt_state"][0]["nu"]["head"]["kernel"][0, 0] = np.nan  # Adam's second moment only

    _rewrite_state(wd, 4, poison)
    assert train_main(tiny_argv(demo_dir, wd, "--config.total_steps=6")) == 1
    line = one_error_line(capsys)
    assert re.search(r"checkpoint step 4 .*non-finite values \(opt_state/0/nu/head/kernel\).*cannot be resumed",
                     line), line
    assert _steps(wd) == ["2", "4"]  # nothing renamed, nothing new


def test_non_finite_gradient_norm_with_a_finite_loss_stops_the_run_unsaved(run4, demo_dir, tmp_path, capsys):
    big = _copy(run4, tmp_path / "big")

    def scale_final_norm(tree):
        tree["params"]["norm"]["scale"] *= 1e25  # finite: the checkpoint loads

    _rewrite_state(big, 4, scale_final_norm)
    wd = str(tmp_path / "run")
    # A fresh run initialized from it (init_from keeps the parameters only), with clipping: the
    # clipped update of a finite gradient by an infinite norm is 0, so the loss, the parameters
    # and the optimizer state stay finite; only the gradient norm is not.
    assert train_main(tiny_argv(demo_dir, wd, f"--config.init_from={big}", "--config.optim.grad_clip_norm=1.0",
                                "--config.total_steps=3", "--config.checkpoint_every_steps=1")) == 1
    line = one_error_line(capsys)
    m = re.search(r"error: Non-finite gradient \(loss (\S+), grad norm (\S+)\) at step 1; stopped without saving it; "
                  r"there is no checkpoint yet", line)
    assert m, line
    assert math.isfinite(float(m.group(1))) and float(m.group(1)) > 1e20, line
    assert not math.isfinite(float(m.group(2))), line
    assert _steps(wd) == []


# ---------------------------------------------------------------------------------------------
# Damaged array files in the newest step.


def _largest_array_file(workdir: str, step: int = 4) -> str:
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


def _truncate(workdir: str) -> None:
    """Cuts the largest array file of step 4 to half its size (a cut-short copy)."""
    path = _largest_array_file(workdir)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _flip(workdir: str) -> None:
    """Flips the lowest bit of the middle byte of step 4's largest array file (bit rot: the file
    keeps its size and still decompresses; the array chunks carry no checksum of their own, so
    orbax alone reads back a changed value: the checksums saved in each step's ``meta`` catch it)."""
    path = _largest_array_file(workdir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes([byte ^ 0x01]))


DAMAGE = {"truncated": _truncate, "byte_flipped": _flip}


@pytest.mark.parametrize("damage", [d if d == "truncated" else pytest.param(d, marks=pytest.mark.slow)
                                    for d in sorted(DAMAGE)])
def test_damaged_array_file_in_the_newest_step(run4, demo_dir, tmp_path, damage, capsys):
    from halluvit_jax.evaluate import main as evaluate_main

    reference = hv.load(run4)
    wd = _copy(run4, tmp_path / "run")
    DAMAGE[damage](wd)
    # Loading and evaluating refuse, naming the broken step and the intact one.
    with pytest.raises(CheckpointError) as err:
        hv.load(wd)
    message = str(err.value)
    assert "\n" not in message and "checkpoint step 4" in message and "newest intact step is 2" in message, message
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", wd]) == 1
    line = one_error_line(capsys)
    assert "checkpoint step 4" in line and "newest intact step is 2" in line, line
    # Resuming skips it (kept, renamed) and reruns steps 3-4 from step 2: bitwise the original run.
    assert train_main(tiny_argv(demo_dir, wd)) == 0
    out = capsys.readouterr().out
    assert re.search(r"checkpoint step 4 in .* is unreadable .*skipping it \(kept as .*4\.unreadable\)", out), out
    assert re.search(r"Resuming from .* step 2\.", out), out
    assert _steps(wd) == ["2", "4", "4.unreadable"]
    resumed = hv.load(wd)
    assert resumed.step == reference.step == 4
    _assert_variables_bitwise_equal(resumed.variables, reference.variables)


# ---------------------------------------------------------------------------------------------
# A quiet fallback, seen from outside: the library's loggers write to the process's stderr (a
# handler made at import keeps the original stream, which capsys does not see), so the line count
# is taken on a real process's stderr.


def _deleted(workdir: str) -> None:
    """Deletes step 4's largest array file (how the noise was first met: 82,090 stderr lines)."""
    os.remove(_largest_array_file(workdir))


@pytest.mark.slow  # two CLI processes (~1 min) on top of the module's run
@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_step_costs_one_stderr_line_in_a_real_process(run4, demo_dir, tmp_path, damage):
    import subprocess
    import sys

    from test_train_common import REPO, subprocess_env

    wd = _copy(run4, tmp_path / "run")
    {"deleted": _deleted, **DAMAGE}[damage](wd)
    env = subprocess_env(num_devices=1)
    proc = subprocess.run([sys.executable, "-m", "halluvit_jax.evaluate", "--checkpoint", wd],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "checkpoint step 4" in lines[0] and "newest intact step is 2" in lines[0], lines[0]
    # Resuming falls back to step 2, says so on stdout, and writes nothing at all on stderr.
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *tiny_argv(demo_dir, wd)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
    assert re.search(r"Resuming from .* step 2\.", proc.stdout), proc.stdout[-3000:]


def test_a_closed_read_loop_ignores_late_wakeups():
    """TensorStore wakes the loop of a failed orbax read after ``asyncio.run`` closed it (the
    cancelled reads finishing on its threads); a plain loop raises "Event loop is closed" there,
    which TensorStore prints to stderr. Inside ``quiet_reads`` the read loop drops the wake-up;
    outside, asyncio's own loop still raises (the policy is put back)."""
    import asyncio
    import threading

    from halluvit_jax.checkpoint.io import quiet_reads

    async def running_loop():
        return asyncio.get_running_loop()

    def wake_from_a_thread(loop) -> list[BaseException]:
        raised: list[BaseException] = []

        def wake():
            try:
                loop.call_soon_threadsafe(lambda: None)
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion
                raised.append(e)

        t = threading.Thread(target=wake)
        t.start()
        t.join()
        return raised

    with quiet_reads():
        read_loop = asyncio.run(running_loop())
    assert read_loop.is_closed()
    assert wake_from_a_thread(read_loop) == []
    plain_loop = asyncio.run(running_loop())
    raised = wake_from_a_thread(plain_loop)
    assert len(raised) == 1 and "Event loop is closed" in str(raised[0]), raised
