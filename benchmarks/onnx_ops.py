"""The ONNX deploy graph, op by op: what ``write_onnx`` changes against jax2onnx's plain graph.

For each model (deploy form, randomly initialized, symbolic batch), the op histogram of
``before``: the graph jax2onnx writes for the model on its plain path (``impl='plain'``, hMHSA's
hallucination on the maps, MHSA through ``jax.nn.dot_product_attention``: the program XLA runs,
``target='xla'``), Einsums already rewritten as MatMuls (what ``write_onnx`` wrote until
LayerNorm, softmax and GELU became native ops); and ``after``: what ``write_onnx`` writes now,
the model on ``export.ONNX_IMPL`` traced for ONNX through every pass of
``export.graph_passes`` (native ops, Transposes composed, constants computed once, per-channel
affines folded into their layers), with onnxruntime's relative logit error against
``model.apply`` for each graph.

    python benchmarks/onnx_ops.py --models deit_small,deit_small_hal --json benchmarks/results/onnx_ops.json

docs/conversion.md renders its op table from that JSON (benchmarks/render_docs.py).
Needs the ``onnx`` extra; no timing is taken (any load is fine).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_info  # noqa: E402


def _histogram(proto) -> dict[str, int]:
    return dict(sorted(collections.Counter(node.op_type for node in proto.graph.node).items()))


def _error(proto, model: Any, variables: Any, size: int, directory: str, name: str) -> float:
    """Max |onnxruntime - model.apply| over max |logit|, one standard-normal image."""
    import numpy as np

    from halluvit_jax.convert import export

    path = os.path.join(directory, name + ".onnx")
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    x = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
    want = export.reference_logits(model, variables, x)
    got = export.run_onnx(path, x)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def measure(name: str, size: int, directory: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from halluvit_jax.convert import export
    from halluvit_jax.models import create_model, deploy_form
    from halluvit_jax.reparam import reparameterize

    model = create_model(name)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    model, variables = deploy_form(model), reparameterize(variables)  # baselines too (NextViT's BNs)
    plain = export.einsums_to_matmuls(export.export_onnx(model, variables, size, impl="plain",
                                                         target="xla"))
    before = _histogram(plain)
    before_err = _error(plain, model, variables, size, directory, name + "_before")
    proto = export.export_onnx(model, variables, size)
    passes = export.graph_passes(proto)
    after = _histogram(proto)
    return {"model": name, "resolution": size, "impl_before": "plain", "impl_after": export.ONNX_IMPL,
            "passes": passes, "before": before, "after": after,
            "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
            "rel_error_before": before_err,
            "rel_error_after": _error(proto, model, variables, size, directory, name + "_after")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deit_small,deit_small_hal", help="comma-separated registered names")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--json", default="", help="write the report here")
    args = ap.parse_args(argv)
    head = run_info.header("onnx_ops", __file__, argv, extra=("jax2onnx", "onnx", "onnxruntime"))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models.split(","):
            row = measure(name, args.resolution, directory)
            print(f"{name}: {row['nodes_before']} -> {row['nodes_after']} nodes, relative logit error "
                  f"{row['rel_error_before']:.1e} -> {row['rel_error_after']:.1e}", flush=True)
            rows.append(row)
    if args.json:
        run_info.write_json(args.json, {**head, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
