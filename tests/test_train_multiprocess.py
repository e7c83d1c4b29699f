"""Two processes on this machine (`jax.distributed.initialize` on localhost, gloo CPU
collectives, one device each) train the demo and agree with one process on two devices."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import data_fixtures as dfx
import pytest
from test_train_common import REPO, TINY_MODEL, subprocess_env, tiny_demo_config, train_losses

from halluvit_jax.train import train_and_evaluate

STEPS = 4
# Deterministic preprocessing and no drop-path: the per-process augmentation RNG streams and the
# per-row dropout masks depend on how rows are laid out across processes, the data do not.
FIELDS = {"total_steps": STEPS, "checkpoint_every_steps": STEPS, "eval_every_steps": STEPS,
          "input.train_ops": "resize_crop|normalize", "model.drop_path_rate": 0.0}

_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, data_dir, workdir, fields = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    sys.path.insert(0, "tests")
    from test_train_common import tiny_demo_config
    from halluvit_jax.train import train_and_evaluate
    config = tiny_demo_config(data_dir, **json.loads(fields))
    config.distributed = True  # already initialized above: the trainer must not re-initialize
    train_and_evaluate(config, workdir)
    print("WORKER_DONE", jax.process_index(), jax.process_count(), jax.device_count())
""")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return dfx.prepared_demo(tmp_path_factory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three training runs (~100 s on 2 busy cores): `pytest -m slow`
def test_two_processes_agree_with_one(demo_dir, tmp_path):
    multi_dir = str(tmp_path / "multi")
    env = subprocess_env(num_devices=1)
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, port, str(i), demo_dir, multi_dir, json.dumps(FIELDS)],
                         env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
        assert f"WORKER_DONE {i} 2 2" in out

    single_dir = str(tmp_path / "single")
    train_and_evaluate(tiny_demo_config(demo_dir, **FIELDS, **{"mesh.num_devices": 2}), single_dir)

    multi, single = train_losses(multi_dir), train_losses(single_dir)
    assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
    for step in single:
        assert multi[step] == pytest.approx(single[step], rel=1e-5), step
    # The checkpoint written jointly by the two processes restores in this single process.
    from test_train_common import final_state

    step, state = final_state(multi_dir)
    _, ref = final_state(single_dir)
    assert step == STEPS
    import jax
    import numpy as np

    # Adam turns float-rounding-sized gradient differences of near-zero gradients into
    # lr-sized steps, so parameters agree to ~lr (the losses above are the tight check).
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-3),
                           state["params"], ref["params"])
    assert TINY_MODEL["depth"] == len([k for k in state["params"] if k.startswith("blocks_")])
