"""onnxruntime's second thread on the per-layer MatMuls of DeiT-S at batch 1: how much faster
each runs on two intra-op threads than on one, for the baseline's shapes and the hal model's.

Issue 24 asks the hal graph for 0.9 of its FLOP ideal over the baseline; on this 2-core host
DeiT-S keeps 0.93 of it on one thread and less on onnxruntime's default two
(docs/conversion.md). The cases (``MATMULS``): the head products over six heads (the
baseline) and over three (each half of the hal model), the three-head product with its rows
split in two (six GEMMs of half the rows), ``fc2`` (1536 -> 384) and cFFN's ``fc2a`` at its 205
columns and at 192 and 224, and ``fc2b`` (205 -> 384). Each is a one-node graph, timed on 1
and on 2 intra-op threads (one inter-op thread) in ``--turns`` turns: per turn every case and
thread count gets a fresh session, 2 runs untimed, then ``--runs`` timed; the figure is the
median over all its timed runs, in microseconds. One session is alive at a time: onnxruntime's
idle workers spin for about 40 ms after a run, and a two-thread session's spinning worker takes
a core from whichever session runs next (interleaving live sessions run by run, as a first
version of this script did, gave speed-ups from 1.0 to 4.5 for the same MatMul).

    python benchmarks/ort_threads.py --json benchmarks/results/ort_threads.json

docs/conversion.md renders its table from that JSON (benchmarks/render_docs.py, kind
``ort_threads``). Needs the ``onnx`` extra. Timing: run it on an idle host.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_info  # noqa: E402

THREADS = (1, 2)

# name: (A shape, B shape, B constant?) at batch 1, DeiT-S (N = 197, d = 64, hidden 1536).
MATMULS = {
    "logits, 6 heads (base)": ((1, 6, 197, 64), (1, 6, 64, 197), False),
    "logits, 3 heads (hal, per half)": ((1, 3, 197, 64), (1, 3, 64, 197), False),
    "logits, 3 heads, rows split in 2 (6 GEMMs)": ((1, 3, 2, 99, 64), (1, 3, 2, 64, 197), False),
    "attn @ v, 6 heads (base)": ((1, 6, 197, 197), (1, 6, 197, 64), False),
    "attn @ v, 3 heads (hal, per half)": ((1, 3, 197, 197), (1, 3, 197, 64), False),
    "fc2, 1536 -> 384 (base)": ((1, 197, 1536), (1536, 384), True),
    "fc2a, 1536 -> 205 (hal)": ((1, 197, 1536), (1536, 205), True),
    "fc2a at 192 columns": ((1, 197, 1536), (1536, 192), True),
    "fc2a at 224 columns": ((1, 197, 1536), (1536, 224), True),
    "fc2b, 205 -> 384 (hal)": ((1, 197, 205), (205, 384), True),
}


def _matmul_graph(a_shape, b_shape, b_const: bool) -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a_shape))]
    inits = []
    if b_const:
        w = np.random.default_rng(1).standard_normal(b_shape).astype(np.float32) * 0.02
        inits.append(numpy_helper.from_array(w, "b"))
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b_shape)))
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["z"])], "matmul", inputs,
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def time_matmuls(turns: int, runs: int = 20) -> list[dict[str, Any]]:
    """Median microseconds per run of each `MATMULS` case on 1 and 2 threads (module docstring)."""
    import numpy as np

    from halluvit_jax.convert.export import onnx_session

    rng = np.random.default_rng(0)
    cases = {}
    for name, (a, b, const) in MATMULS.items():
        feed = {"a": rng.standard_normal(a).astype(np.float32)}
        if not const:
            feed["b"] = rng.standard_normal(b).astype(np.float32)
        cases[name] = (_matmul_graph(a, b, const), feed)
    times = collections.defaultdict(list)
    for _ in range(turns):
        for name, (model, feed) in cases.items():
            for t in THREADS:
                sess = onnx_session(model, t)
                for _ in range(2):
                    sess.run(None, feed)
                for _ in range(runs):
                    start = time.perf_counter()
                    sess.run(None, feed)
                    times[name, t].append(time.perf_counter() - start)
                del sess
    return [{"case": name, "a": list(a), "b": list(b), "b_constant": const,
             "us": {str(t): statistics.median(times[name, t]) * 1e6 for t in THREADS}}
            for name, (a, b, const) in MATMULS.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per session")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    head = run_info.header("ort_threads", __file__, argv, extra=("onnx", "onnxruntime"))
    rows = time_matmuls(args.turns, args.runs)
    for row in rows:
        us = row["us"]
        print(f"{row['case']:<45} 1 thread {us['1']:7.0f} us  2 threads {us['2']:7.0f} us  "
              f"x{us['1'] / us['2']:.2f}", flush=True)
    if args.json:
        head["machine"]["load_average_end"] = run_info.loadavg()
        run_info.write_json(args.json, {**head, "config": {"turns": args.turns, "runs": args.runs,
                                                           "threads": list(THREADS)}, "matmuls": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
