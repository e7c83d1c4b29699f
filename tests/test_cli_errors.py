"""Every ordinary mistake on every command line is one `error:` line on stderr with exit status
2 (usage) or 1 (runtime), without a traceback (issue 15). Run in-process through each CLI's
`main(argv)` (the exit-code/traceback convention of `halluvit_jax.cli.run_main`)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import data_fixtures as dfx
import pytest
from test_train_common import CONFIGS, REPO, TINY_CLI, tiny_demo_config

DEMO = os.path.join(CONFIGS, "demo.py")


def _train_py():
    spec = importlib.util.spec_from_file_location("train_py_cli", os.path.join(REPO, "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_main(argv):
    from halluvit_jax.cli import run_main

    return run_main(_train_py().main, argv)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return dfx.prepared_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def workdir(demo_dir, tmp_path_factory):
    """A 4-step tiny demo run with checkpoints at steps 2 and 4 (one compile)."""
    from halluvit_jax.train import train_and_evaluate

    wd = str(tmp_path_factory.mktemp("cli") / "run")
    train_and_evaluate(tiny_demo_config(demo_dir, total_steps=4, checkpoint_every_steps=2,
                                        eval_every_steps=-1, **{"mesh.num_devices": 1}), wd)
    return wd


# ---------------------------------------------------------------------------------------------
# train.py


@pytest.mark.parametrize("argv, pattern", [
    ([f"--config={CONFIGS}/demoo.py", "--workdir=/tmp/x"], "config file .*demoo.py' does not exist; did you mean configs/demo.py"),
    ([f"--config={DEMO}", "--config.optim.lrr=1", "--workdir=/tmp/x"], "unknown config field optim.lrr .*did you mean optim.lr\\?"),
    ([f"--config={DEMO}", "--config.optimm.lr=1", "--workdir=/tmp/x"], "unknown config field optimm.lr .*did you mean optim.lr\\?"),
    ([f"--config={DEMO}:bogus=1", "--workdir=/tmp/x"], "Unknown config argument\\(s\\) \\['bogus'\\]"),
    ([f"--config={DEMO}", "--config.optim.lr=abc", "--workdir=/tmp/x"], "could not convert string to float"),
    ([f"--config={DEMO}"], "--workdir is required"),
    (["--workdir=/tmp/x"], "--config is required"),
    ([f"--config={DEMO}", "--config.mesh.partitioner=xla", "--workdir=/tmp/x"],
     "mesh.partitioner must be one of .*got 'xla'; set --config.mesh.partitioner=auto"),
    ([f"--config={DEMO}", "--workdir=/tmp/x", "--bogus"], "Unknown command line flag 'bogus'"),
])
def test_train_usage_errors_exit_2_with_one_line(argv, pattern, capsys):
    import re

    assert train_main(argv) == 2
    assert re.search(pattern, one_error_line(capsys))


def test_train_runtime_errors_exit_1_with_one_line(tmp_path, demo_dir, capsys):
    base = [f"--config={DEMO}:data_dir={demo_dir}", *TINY_CLI, "--config.mesh.num_devices=1"]
    # A dataset that was never prepared (prepare_demo off): the DatasetNotPreparedError line.
    assert train_main([f"--config={DEMO}:data_dir={tmp_path}/nodata", "--config.prepare_demo=False",
                       f"--workdir={tmp_path}/a"]) == 1
    line = one_error_line(capsys)
    assert "is not prepared in" in line and "prepare demo --data_dir" in line
    # An odd hMHSA head count.
    assert train_main([*base, "--config.model.num_heads=3", f"--workdir={tmp_path}/b"]) == 1
    line = one_error_line(capsys)
    assert "even head count" in line and "--config.model" in line
    # An unknown model name.
    assert train_main([*base, "--config.model_name=deit_tinyy_hal", f"--workdir={tmp_path}/c"]) == 1
    assert "Unknown model 'deit_tinyy_hal'" in one_error_line(capsys)


def test_train_help_lists_presets_and_fields_and_exits_0(capsys):
    assert train_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "configs/deit_s_hal.py" in out and "configs/demo.py" in out
    for field in ("optim.lr", "total_steps", "global_batch_size", "input.data_dir"):
        assert field in out


def test_train_with_another_architecture_on_a_workdir_is_one_line(workdir, demo_dir, tmp_path, capsys):
    wd = str(tmp_path / "copy")
    shutil.copytree(workdir, wd)
    argv = [f"--config={DEMO}:data_dir={demo_dir}", *TINY_CLI, "--config.model.depth=1",
            "--config.mesh.num_devices=1", f"--workdir={wd}", "--config.total_steps=6"]
    assert train_main(argv) == 1
    line = one_error_line(capsys)
    assert "checkpoint step 4" in line and "does not match the model" in line and "params/blocks_1" in line
    with open(os.path.join(wd, "config.json")) as f:  # the config that does not fit is not saved
        assert json.load(f)["model"]["depth"] == 2


# ---------------------------------------------------------------------------------------------
# python -m halluvit_jax.evaluate


def test_evaluate_without_config_reads_the_workdir_config(workdir, capsys):
    from halluvit_jax.evaluate import main

    assert main(["--checkpoint", workdir, "--batch_size=64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 4 and result["count"] == 297 and 0.0 <= result["top1"] <= 1.0


def test_evaluate_errors_are_one_line(workdir, tmp_path, capsys):
    from halluvit_jax.evaluate import main

    # Another architecture than the checkpoint's: refused, naming the unused leaves.
    assert main(["--checkpoint", workdir, "--config.model.depth=1"]) == 1
    line = one_error_line(capsys)
    assert "does not match the model" in line and "unused params/blocks_1" in line
    assert main(["--checkpoint", str(tmp_path / "nope")]) == 1
    assert "does not exist" in one_error_line(capsys)
    assert main(["--checkpoint", workdir, "--config.model.num_heads=3"]) == 1  # odd hMHSA heads
    assert "even head count" in one_error_line(capsys)
    assert main(["--checkpoint", workdir, "--config.model.dpth=1"]) == 2
    assert "did you mean model.depth?" in one_error_line(capsys)
    assert main(["--checkpoint", workdir, "--ema"]) == 1
    assert "no EMA weights" in one_error_line(capsys)
    assert main(["--config", f"{CONFIGS}/demoo.py", "--checkpoint", workdir]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert main([]) == 2
    assert "--checkpoint is required" in one_error_line(capsys)


@pytest.mark.parametrize("damage", ["array_file", "metadata"])
def test_evaluate_names_the_broken_step_and_the_intact_one(workdir, tmp_path, damage, capsys):
    from halluvit_jax.evaluate import main

    wd = tmp_path / "copy"
    shutil.copytree(workdir, wd)
    state = wd / "checkpoints" / "4" / "state"
    if damage == "array_file":
        for f in (state / "d").iterdir():
            f.unlink()
    else:
        (state / "_METADATA").unlink()
    assert main(["--checkpoint", str(wd)]) == 1
    line = one_error_line(capsys)
    assert "checkpoint step 4" in line and "unreadable" in line and "newest intact step is 2" in line
    assert (wd / "checkpoints" / "4").is_dir()  # never deleted


# ---------------------------------------------------------------------------------------------
# convert, analysis, complexity, data.prepare


def test_convert_subcommand_help_shows_defaults(capsys):
    from halluvit_jax.convert.__main__ import main

    assert main(["hal", "--help"]) == 0
    assert "(default: 64)" in capsys.readouterr().out  # --calib-images
    assert main(["deploy"]) == 2  # argparse usage error, one line
    assert "required" in one_error_line(capsys)


def test_analysis_complexity_prepare_errors_are_one_line(tmp_path, capsys):
    from halluvit_jax.analysis.__main__ import main as analysis_main
    from halluvit_jax.complexity import main as complexity_main
    from halluvit_jax.data.prepare import main as prepare_main

    assert analysis_main(["ccs", "--checkpoint", str(tmp_path / "nope")]) == 1
    assert "does not exist" in one_error_line(capsys)
    assert complexity_main(["--models", "deit_tinyy"]) == 2
    assert "Unknown model 'deit_tinyy'" in one_error_line(capsys)
    assert complexity_main(["--bogus"]) == 2  # argparse usage errors: one line too
    assert "unrecognized arguments: --bogus" in one_error_line(capsys)
    assert prepare_main(["imagenet2012", "--data_dir", str(tmp_path / "d"), "--manual_dir", str(tmp_path / "x")]) == 2
    one_error_line(capsys)


def test_run_main_convention(capsys, monkeypatch):
    from halluvit_jax.cli import UsageError, UserError, run_main

    def raises(exc):
        def main(argv):
            raise exc
        return main

    assert run_main(raises(UsageError("bad flag; fix it")), []) == 2
    assert one_error_line(capsys) == "error: bad flag; fix it"
    assert run_main(raises(UserError("broken")), []) == 1
    assert run_main(raises(KeyboardInterrupt()), []) == 130
    assert "interrupted" in capsys.readouterr().err
    with pytest.raises(RuntimeError):  # a genuine bug keeps its traceback
        run_main(raises(RuntimeError("bug")), [])
    assert run_main(raises(UserError("broken")), ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("HALLUVIT_DEBUG", "1")
    assert run_main(raises(UserError("broken")), []) == 1
    assert "Traceback" in capsys.readouterr().err
