"""No diverged or corrupted run can poison a checkpoint (issue 15).

* The non-finite guard covers everything a checkpoint holds (loss, gradients, parameters,
  BatchNorm statistics, optimizer state, EMA): a non-finite step is never saved, the run exits 1
  naming the last finite checkpoint; restoring a non-finite checkpoint is refused.
* A corrupt latest step is reported and skipped on resume (kept, renamed ``<step>.unreadable``);
  the resumed run is bitwise the uninterrupted one, and ``metrics.jsonl`` has one row per step.
* SIGINT saves and exits 130; a finished run says so; ``runlocal,data=demo`` of every preset runs.
* Quiet logs: no orbax metadata warning on load, no fake TFDS "Downloading" line, ETA after compile.

In-process through ``train.py``'s ``main(argv)`` except where the process itself (a signal, its
exit status) is under test.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import data_fixtures as dfx
import numpy as np
import pytest
from test_cli_errors import one_error_line, train_main
from test_train_common import (
    CONFIGS,
    REPO,
    TINY_CLI,
    assert_trees_bitwise_equal,
    final_state,
    read_metrics,
    subprocess_env,
    train_cmd,
)

DEMO = os.path.join(CONFIGS, "demo.py")
# Every case trains (a 4-step run, subprocesses, every preset): the fast tier keeps the pieces
# (test_reliability_pieces.py: the NaN optimizer state, the non-finite gradient norm, a damaged file).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return dfx.prepared_demo(tmp_path_factory)


def tiny_argv(demo_dir: str, workdir: str, *extra: str) -> list[str]:
    return [f"--config={DEMO}:data_dir={demo_dir}", f"--workdir={workdir}", *TINY_CLI,
            "--config.global_batch_size=16", "--config.optim.warmup_steps=2", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=2", "--config.input.num_threads=2", "--config.tensorboard=False",
            "--config.eval_every_steps=-1", "--config.mesh.num_devices=1", "--config.total_steps=4", *extra]


@pytest.fixture(scope="module")
def run4(demo_dir, tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4."""
    wd = str(tmp_path_factory.mktemp("rel") / "run")
    assert train_main(tiny_argv(demo_dir, wd)) == 0
    return wd


def _steps(workdir: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _all_checkpoints_finite(workdir: str) -> bool:
    from halluvit_jax.checkpoint import read_checkpoint
    from halluvit_jax.checkpoint.trees import first_non_finite

    return all(first_non_finite(read_checkpoint(workdir, s).state) is None for s in _steps(workdir))


# ---------------------------------------------------------------------------------------------
# The non-finite guard.


def test_non_finite_step_is_never_saved_and_the_run_exits_1(run4, demo_dir, tmp_path, capsys):
    wd = str(tmp_path / "run")
    shutil.copytree(run4, wd)
    # nan learning rate: step 5's parameters (and everything after them) are NaN, its loss is not.
    assert train_main(tiny_argv(demo_dir, wd, "--config.optim.lr=nan", "--config.total_steps=8",
                                "--config.checkpoint_every_steps=1")) == 1
    line = one_error_line(capsys)
    assert re.search(r"error: Non-finite .* at step 5\b.*the last finite checkpoint is step 4\b", line), line
    assert _steps(wd) == [2, 4] and _all_checkpoints_finite(wd)
    # No checkpoint at all yet: said so instead of "step None".
    fresh = str(tmp_path / "fresh")
    assert train_main(tiny_argv(demo_dir, fresh, "--config.optim.lr=nan", "--config.total_steps=8",
                                "--config.checkpoint_every_steps=1")) == 1
    line = one_error_line(capsys)
    assert "at step 1;" in line and "there is no checkpoint yet" in line
    assert not _steps(fresh)


def test_guard_covers_batch_stats_optimizer_state_and_ema():
    import functools

    import jax
    import jax.numpy as jnp
    import ml_collections

    import halluvit_jax as hv
    from halluvit_jax.train import optim, steps

    model = hv.create_model("deit_tiny_hal", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4,
                            mlp_ratio=2.0, num_classes=10)
    cfg = ml_collections.ConfigDict({"name": "adamw", "lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                                     "weight_decay": 0.05})
    lr_fn = optim.create_learning_rate_fn(base_lr=1e-3, total_steps=10, warmup_steps=0)
    tx = optim.create_optimizer(cfg, lr_fn)
    state = steps.create_train_state(jax.random.key(0), model=model, tx=tx, image_size=32, use_ema=True)
    step = jax.jit(functools.partial(
        steps.train_step, apply_fn=model.apply, tx=tx, learning_rate_fn=lr_fn, ema_decay=0.9,
        targets_fn=lambda rng, x, y: (x, jax.nn.one_hot(y, 10))))
    batch = {"image": jnp.ones((4, 32, 32, 3)), "label": jnp.arange(4)}

    def poison_first(tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        i = next(i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating) and x.size > 1)
        leaves[i] = leaves[i].at[(0,) * leaves[i].ndim].set(jnp.inf)
        return jax.tree_util.tree_unflatten(treedef, leaves)

    _, metrics = step(state, batch, jax.random.key(1))
    assert float(metrics["finite"]) == 1.0
    for field in ("batch_stats", "opt_state", "ema_params"):
        bad = state.replace(**{field: poison_first(getattr(state, field))})
        _, metrics = step(bad, batch, jax.random.key(1))
        assert np.isfinite(float(metrics["loss"])), field
        assert float(metrics["finite"]) == 0.0, field


def test_restore_refuses_a_non_finite_checkpoint(run4, demo_dir, tmp_path, monkeypatch, capsys):
    import halluvit_jax as hv
    from halluvit_jax.loading import NonFiniteCheckpointError
    from halluvit_jax.train import trainer

    wd = str(tmp_path / "run")
    shutil.copytree(run4, wd)
    with monkeypatch.context() as m:  # what an unguarded trainer would have written
        m.setattr(trainer, "_check_finite", lambda *a, **k: None)
        assert train_main(tiny_argv(demo_dir, wd, "--config.optim.lr=nan", "--config.total_steps=5",
                                    "--config.checkpoint_every_steps=1")) == 0
    capsys.readouterr()
    with pytest.raises(NonFiniteCheckpointError, match="step 5 .* holds non-finite values"):
        hv.load(wd)
    assert train_main(tiny_argv(demo_dir, wd, "--config.total_steps=6")) == 1
    line = one_error_line(capsys)
    assert "checkpoint step 5" in line and "non-finite values" in line and "cannot be resumed" in line


# ---------------------------------------------------------------------------------------------
# Corrupt steps, metrics, finished runs.


@pytest.mark.parametrize("damage", ["array_file", "metadata"])
def test_corrupt_latest_step_is_skipped_and_the_resume_is_bitwise(run4, demo_dir, tmp_path, damage, capsys):
    ref_step, ref = final_state(run4)
    wd = str(tmp_path / "run")
    shutil.copytree(run4, wd)
    state_dir = os.path.join(wd, "checkpoints", "4", "state")
    if damage == "array_file":
        for f in glob.glob(os.path.join(state_dir, "d", "*")):
            os.remove(f)
    else:
        os.remove(os.path.join(state_dir, "_METADATA"))
    assert train_main(tiny_argv(demo_dir, wd)) == 0
    out = capsys.readouterr().out
    assert re.search(r"checkpoint step 4 in .* is unreadable .*skipping it \(kept as .*4\.unreadable\)", out), out
    assert re.search(r"Resuming from .* step 2\.", out)
    assert os.path.isdir(os.path.join(wd, "checkpoints", "4.unreadable"))  # kept, not deleted
    step, state = final_state(wd)
    assert step == ref_step == 4
    assert_trees_bitwise_equal(ref, state)
    # Steps 3 and 4 ran twice; metrics.jsonl still has one row each.
    counts = collections.Counter(m["step"] for m in read_metrics(wd) if "train/loss" in m)
    assert sorted(counts) == [1, 2, 3, 4] and set(counts.values()) == {1}


def test_a_corrupt_newest_step_costs_one_line_and_no_library_noise(run4, demo_dir, tmp_path):
    """The largest array file of the newest step deleted (issue 22): evaluate prints its one
    ``error:`` line, resume its one warning (stdout), and neither prints anything else on stderr
    (no orbax / asyncio tracebacks of the cancelled reads)."""
    wd = str(tmp_path / "run")
    shutil.copytree(run4, wd)
    files = glob.glob(os.path.join(wd, "checkpoints", "4", "state", "**", "d", "*"), recursive=True)
    os.remove(max(files, key=os.path.getsize))
    env = subprocess_env(num_devices=1)
    ev = subprocess.run([sys.executable, "-m", "halluvit_jax.evaluate", f"--checkpoint={wd}"], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 1 and len(ev.stderr.splitlines()) == 1, ev.stderr[-3000:]
    assert ev.stderr.startswith("error: checkpoint step 4 ") and "newest intact step is 2" in ev.stderr
    tr = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *tiny_argv(demo_dir, wd)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert tr.returncode == 0 and tr.stderr == "", tr.stderr[-3000:]
    warnings = [line for line in tr.stdout.splitlines() if "unreadable" in line]
    assert len(warnings) == 1 and "checkpoint step 4" in warnings[0], tr.stdout[-3000:]
    assert re.search(r"Resuming from .* step 2\.", tr.stdout)


def test_finished_run_says_so_and_prints_its_final_metrics(run4, demo_dir, capsys):
    before = read_metrics(run4)
    assert train_main(tiny_argv(demo_dir, run4)) == 0
    out = capsys.readouterr().out
    assert re.search(r"Already finished: .* at step 4 of 4; .*Final metrics: .*train/loss", out), out
    assert read_metrics(run4) == before


# ---------------------------------------------------------------------------------------------
# Signals (the process under test).


def test_sigint_saves_a_checkpoint_and_exits_130(demo_dir, tmp_path):
    from test_train_resume import _finalized_steps, _wait_for

    workdir = str(tmp_path / "run")
    cmd = train_cmd(demo_dir, workdir, "--config.total_steps=100000", "--config.checkpoint_every_steps=1000")
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    _wait_for(lambda: os.path.exists(metrics) and len(read_metrics(workdir)) >= 2, proc, 240, "2 steps")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    saved = _finalized_steps(workdir)
    assert len(saved) == 1
    assert re.search(rf"Preempted at step {saved[0]}; checkpoint saved", out)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


# ---------------------------------------------------------------------------------------------
# runlocal on every preset, any dataset size.


def _runlocal(preset: str, demo_dir: str, workdir: str) -> None:
    argv = [f"--config={CONFIGS}/{preset}.py:runlocal,data=demo", f"--workdir={workdir}",
            f"--config.input.data_dir={demo_dir}", "--config.total_steps=2", "--config.eval_every_steps=2",
            "--config.checkpoint_every_steps=2", "--config.log_every_steps=1", "--config.tensorboard=False",
            "--config.mesh.num_devices=1"]
    assert train_main(argv) == 0, preset
    final = read_metrics(workdir)
    assert any("eval/top1" in m for m in final) and _steps(workdir) == [2], preset


def _presets() -> list[str]:
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS, "*.py")))


def test_runlocal_demo_smoke_run_of_the_documented_preset(demo_dir, tmp_path):
    _runlocal("deit_s_hal", demo_dir, str(tmp_path / "smoke"))


def test_runlocal_demo_of_every_preset(demo_dir, tmp_path):
    presets = _presets()
    assert len(presets) >= 10
    for preset in presets:
        # deit_s_hal: the fast tier runs it; transfer needs init= and dataset= (tests/test_transfer.py
        # runs it end to end).
        if preset not in ("deit_s_hal", "transfer"):
            _runlocal(preset, demo_dir, str(tmp_path / preset))


def test_runlocal_data_demo_has_a_data_dir_and_slices_fit_any_split(demo_dir, monkeypatch):
    from test_train_common import load_config

    from halluvit_jax.data import pipeline

    monkeypatch.setenv("HALLUVIT_DATA_DIR", demo_dir)
    c = load_config("deit_s_hal", "runlocal,data=demo")
    assert c.input.data_dir == demo_dir and c.prepare_demo  # was None: prepare_demo(None) crashed
    c.input.train_split, c.input.eval_split = "train[:5000]", "validation[:64]"
    fitted = pipeline.fit_splits(c.input)
    assert fitted.train_split == "train[:1500]" and fitted.eval_split == "validation[:64]"


# ---------------------------------------------------------------------------------------------
# Quiet logs.


def test_loading_and_preparing_are_quiet(run4, tmp_path, caplog, capfd):
    import ml_collections

    import halluvit_jax as hv
    from halluvit_jax.data import demo
    from halluvit_jax.data.config import demo_input_config

    with caplog.at_level(logging.INFO):
        loaded = hv.load(run4)
    assert loaded.step == 4 and loaded.kind == "training"
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
    capfd.readouterr()
    demo.prepare_if_missing(ml_collections.ConfigDict(demo_input_config(str(tmp_path / "d")).to_dict()))
    out, err = capfd.readouterr()
    assert "Downloading and preparing" not in out + err and "downloaded and prepared" not in out + err


def test_eta_comes_from_steps_after_compilation(monkeypatch):
    from halluvit_jax.train import metrics

    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    p = metrics.Progress(total_steps=101, global_batch_size=10, start_step=0)
    now[0] = 60.0  # compiling the first step
    p.start(1)
    line, _ = p.line(1, {"loss": 1.0})
    assert "ETA" not in line and "compiled" in line
    now[0] = 70.0  # 10 steps in 10 s after compilation
    line, img_s = p.line(11, {"loss": 1.0})
    assert img_s == pytest.approx(10.0) and "ETA 0:01:30" in line
