"""Wall time of the attention core alone on the local accelerator (a GPU where one is lent): MHSA
(einsums; XLA's and cuDNN's ``dot_product_attention``) against the hMHSA formulations, forward and
forward+backward, for the shapes of benchmarks/attention_core_tpu.py (one layer, batch 128).

It is the timed counterpart of attention_core_tpu.py's compiler estimate: the same candidate
cores (``candidates()``) on real arrays, each jitted alone, timed as the median of ``--iters``
calls after ``--warmup``, with XLA's own ``bytes accessed`` and FLOPs of the compiled program
beside it. A core that fails to compile or run (cuDNN's kernel refusing a shape, say) is a row
with its one-line error, so one refusal costs no other row.

    python benchmarks/attention_core_gpu.py --json benchmarks/results/attention_core_gpu.json

On CPU it runs too (small ``--batch``), to check the script; its times then mean little.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_info  # noqa: E402
from attention_core_tpu import SHAPES, candidates, hal_param_shapes  # noqa: E402

MHSA_CUDNN = "mhsa_cudnn"
HMHSA_TRITON = "hmhsa_triton"


def _cores() -> dict:
    import jax

    out = dict(candidates())
    out.pop("hmhsa_pallas", None)  # TPU (Mosaic) only
    if jax.default_backend() == "gpu":  # the Triton kernels lower for GPUs only
        from halluvit_jax.layers.kernels import hmhsa_triton

        out[HMHSA_TRITON] = ("hal", hmhsa_triton.hmhsa_core)
    out[MHSA_CUDNN] = ("mhsa", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn"))
    return out


def measure(shape: str, name: str, *, batch: int, variant: str, backward: bool, iters: int,
            warmup: int, dtype: str = "bfloat16") -> dict:
    """One core on one shape: time, XLA's bytes and FLOPs, or the error."""
    import jax
    import jax.numpy as jnp

    n, nk, grid, prefix, c, h = SHAPES[shape]
    d, hr = c // h, h // 2
    kind, core = _cores()[name]
    dt = jnp.dtype(dtype)
    keys = iter(jax.random.split(jax.random.key(0), 8))
    arr = lambda *s: jax.random.normal(next(keys), s, jnp.float32).astype(dt)  # noqa: E731
    qk_heads = h if kind == "mhsa" else hr
    q, k, v = arr(batch, n, qk_heads, d), arr(batch, nk, qk_heads, d), arr(batch, nk, h, d)
    args = [q, k, v]
    if kind == "hal":
        args.append({name: arr(*shape) * 0.1 for name, shape in hal_param_shapes(hr, variant).items()})
        static = dict(variant=variant, kv_grid=grid, num_prefix_tokens=prefix)
        fwd = lambda q, k, v, p: core(q, k, v, p, **static)  # noqa: E731
    else:
        fwd = core
    fn = fwd
    if backward:
        g = arr(batch, n, h, d)

        def fn(*a):
            out, vjp = jax.vjp(fwd, *a)
            return vjp(g)

    row = {"shape": shape, "core": name, "variant": variant if kind == "hal" else None,
           "pass": "fwd+bwd" if backward else "fwd", "batch": batch}
    try:
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        row["gbytes"] = cost.get("bytes accessed", math.nan) / 1e9
        row["gflops"] = cost.get("flops", math.nan) / 1e9
        for _ in range(warmup):
            jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t)
        row["ms"] = statistics.median(times) * 1e3
        row["times_ms"] = [round(t * 1e3, 4) for t in times]
    except Exception as e:  # noqa: BLE001  (a refused core is a row, not the end of the run)
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        row["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="deit_s,pvt_b1_s1,pvt_b1_s2,nextvit_s_s1")
    parser.add_argument("--cores", default="",
                        help="comma-separated; default: mhsa_einsum,mhsa_dpa,mhsa_cudnn,hmhsa_plain,"
                             "hmhsa_xla, and hmhsa_triton on a GPU")
    parser.add_argument("--variants", default="ihh_chh")
    parser.add_argument("--passes", default="fwd,fwd+bwd")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write the rows to this JSON file (rewritten after each row)")
    a = parser.parse_args(argv)
    import jax

    known = _cores()
    a.cores = a.cores or ",".join(["mhsa_einsum", "mhsa_dpa", MHSA_CUDNN, "hmhsa_plain", "hmhsa_xla"]
                                  + [HMHSA_TRITON] * (HMHSA_TRITON in known))
    unknown = [name for name in a.cores.split(",") if name not in known]
    if unknown or any(s not in SHAPES for s in a.shapes.split(",")):
        print(f"error: unknown core or shape; cores: {sorted(known)}, shapes: {sorted(SHAPES)}",
              file=sys.stderr)
        return 2
    report = run_info.header("attention_core_gpu", __file__, argv)
    report.update(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                  settings={"batch": a.batch, "iters": a.iters, "warmup": a.warmup,
                            "dtype": "bfloat16"}, rows=[])
    for shape in a.shapes.split(","):
        for name in a.cores.split(","):
            variants = a.variants.split(",") if known[name][0] == "hal" else ["-"]
            for variant in variants:
                for p in a.passes.split(","):
                    row = measure(shape, name, batch=a.batch, variant=variant,
                                  backward=p == "fwd+bwd", iters=a.iters, warmup=a.warmup)
                    report["rows"].append(row)
                    what = (f"ERROR {row['error']}" if "error" in row else
                            f"{row['ms']:8.3f} ms  {row['gbytes']:7.3f} GB  {row['gflops']:8.2f} GFLOP")
                    print(f"{shape:13s} {name:12s} {str(row['variant']):8s} {row['pass']:8s} {what}",
                          flush=True)
                    if a.json:
                        run_info.write_json(a.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
