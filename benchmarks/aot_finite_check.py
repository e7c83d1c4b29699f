r"""What the train step's NaN guard costs on a TPU: the step compiled with the guard as it was
(one ``isfinite().all()`` per leaf of the parameters, BatchNorm statistics, optimizer state
and EMA) and as it is (``halluvit_jax.train.steps.step_finite``: the loss, the two norms the
step computes anyway and the BatchNorm statistics), deviceless for a TPU topology.

    python benchmarks/aot_finite_check.py --json benchmarks/results/aot_finite_check.json \
        [--config configs/deit_t_hal.py:data=demo] [--per_chip_batch 4] [--topology v5e:2x2]

Each variant is one ``python -m halluvit_jax.aot --step train`` compile (``halluvit_jax.aot.run``,
needs libtpu), one after the other in this process, bf16. Per variant the JSON holds the aot
report of the train step: kernels (fusions of the optimized HLO), CPU and wall seconds of the
lowering and the compile, HBM bytes, FLOPs, memory. docs/aot.md renders it (kind
``aot_finite`` of benchmarks/render_docs.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_info  # noqa: E402

VARIANTS = {
    "per_leaf": "one isfinite().all() per leaf of params, batch_stats, opt_state and EMA (before)",
    "from_norms": "isfinite of loss, grad_norm and param_norm, plus the batch_stats leaves (steps.step_finite)",
}


def per_leaf_finite(loss, grad_norm, param_norm, state, *, check_ema):
    """The guard as it was: every floating leaf of what a checkpoint holds, one reduction each."""
    from halluvit_jax.checkpoint.trees import all_finite

    del param_norm, check_ema
    return all_finite((loss, grad_norm, state.params, state.batch_stats, state.opt_state, state.ema_params))


def compile_variant(variant: str, config_arg: str, topology: str, per_chip_batch: int) -> dict[str, Any]:
    from halluvit_jax import aot, cli
    from halluvit_jax.train import steps

    config = cli.load_config(os.path.join(ROOT, config_arg))  # what --config FILE:ARG loads
    config.compute_dtype = "bfloat16"
    original = steps.step_finite
    if variant == "per_leaf":
        steps.step_finite = per_leaf_finite
    try:
        report = aot.run(config, config_name=config_arg, topology=topology, which=("train",),
                         per_chip_batch=per_chip_batch)
    finally:
        steps.step_finite = original
    report["variant"] = VARIANTS[variant]
    report["load_average_after"] = run_info.loadavg()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/deit_t_hal.py:data=demo")
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--per_chip_batch", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    report = run_info.header("aot_finite_check", __file__, argv, extra=("libtpu",))
    report["settings"] = {"config": args.config, "topology": args.topology, "per_chip_batch": args.per_chip_batch,
                          "compute_dtype": "bfloat16", "step": "train"}
    report["variants"] = {}
    for variant in args.variants.split(","):
        print(f"{variant}: compiling the train step ...", file=sys.stderr, flush=True)
        report["variants"][variant] = compile_variant(variant, args.config, args.topology, args.per_chip_batch)
        rep = report["variants"][variant]["programs"]["train_step"]
        print(f"{variant}: {rep['kernels']} kernels, CPU {rep['lower_cpu_s'] + rep['compile_cpu_s']:.0f} s, "
              f"wall {rep['lower_s'] + rep['compile_s']:.0f} s, {rep['cost']['bytes_accessed'] / 1e6:.0f} MB",
              file=sys.stderr, flush=True)
        report["machine"]["load_average_end"] = run_info.loadavg()
        run_info.write_json(args.json, report)  # after each variant: a stopped run keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
