"""HBM bytes and FLOPs of the attention core alone, MHSA vs hMHSA formulations, from a deviceless
XLA:TPU compile (libtpu from PyPI, no TPU needed): one layer, per chip, forward and
forward+backward, with the copies/transposes/fusions of the optimized HLO.

Inputs are the projected ``q, k, v`` as the projections write them, ``[B, tokens, heads * d]``
(``--inputs qkv``, the core alone: q', k' have ``C/2``
channels for hMHSA) or ``x`` and the projection weights (``--inputs x``, the whole attention
layer, projections included). Shapes (batch 128 per chip by default):

- ``deit_s``: DeiT-S, N = Nk = 197 (class token + 14x14), C = 384, 6 heads;
- ``pvt_b1_s1``: PVTv2-b1 stage 1, N = 3136 (56x56), Nk = 49 (7x7, sr 8), C = 64, 2 heads (hal);
- ``pvt_b1_s2``: PVTv2-b1 stage 2, N = 784, Nk = 49, C = 128, 2 heads;
- ``nextvit_s_s1``: NextViT-S stage 1 NTB, N = 784 (28x28), Nk = 49 (sr 4), C = 192, 6 heads.

    TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu python benchmarks/attention_core_tpu.py --json out.json

Needs ``jax[tpu]`` (libtpu) installed; exits 1 with one line otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {  # name: (N, Nk, grid (Hk, Wk), prefix tokens, C, heads)
    "deit_s": (197, 197, (14, 14), 1, 384, 6),
    "pvt_b1_s1": (3136, 49, (7, 7), 0, 64, 2),
    "pvt_b1_s2": (784, 49, (7, 7), 0, 128, 2),
    "nextvit_s_s1": (784, 49, (7, 7), 0, 192, 6),
}


def _mhsa_core_einsum(q, k, v):
    import jax
    import jax.numpy as jnp

    logits = jnp.einsum("bnhd,bmhd->bnhm", q, k) / math.sqrt(q.shape[-1])
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bnhm,bmhd->bnhd", attn, v)


def _mhsa_core_dpa(q, k, v):
    import jax

    return jax.nn.dot_product_attention(q, k, v)


def _hmhsa_core_plain(q, k, v, params, *, variant, kv_grid, num_prefix_tokens):
    """The plain path's core, exactly as `halluvit_jax.layers.attention.hmhsa` writes it."""
    import jax
    import jax.numpy as jnp

    from halluvit_jax.layers.attention import hallucinate

    real = jnp.einsum("bnhd,bmhd->bnhm", q, k) / math.sqrt(q.shape[-1])
    hal = hallucinate(real, params, variant, kv_grid, num_prefix_tokens)
    logits = jnp.concatenate([real, hal], axis=2).astype(jnp.float32)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnhm,bmhd->bnhd", attn, v)


def _hmhsa_core_shifts(q, k, v, params, *, variant, kv_grid, num_prefix_tokens):
    """The accel core before the hallucination moved onto the keys (commit 4cb431d): real logits
    heads-major, IHH as nine flat shifts of each ``[B, N, Nk]`` map times per-column weights,
    CHH as multiply-adds of the maps, the two softmaxes apart."""
    import jax.numpy as jnp

    from halluvit_jax.layers.attention_accel import attend_halves, hallucinate_heads

    hr, d = q.shape[2], q.shape[3]
    real = jnp.einsum("bnhd,bmhd->bhnm", q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), k)
    heads = [real[:, j].astype(jnp.float32) for j in range(hr)]
    hal = hallucinate_heads(heads, params, variant=variant, kv_grid=kv_grid,
                            num_prefix_tokens=num_prefix_tokens)
    return attend_halves(jnp.stack(heads, axis=1), jnp.stack(hal, axis=1), v)


def candidates():
    """name -> (kind, core): kind "mhsa" takes (q, k, v), "hal" (q', k', v, params, **static)."""
    from halluvit_jax.layers import attention_accel

    out = {
        "mhsa_einsum": ("mhsa", _mhsa_core_einsum),
        "mhsa_dpa": ("mhsa", _mhsa_core_dpa),
        "hmhsa_plain": ("hal", _hmhsa_core_plain),
        "hmhsa_xla": ("hal", attention_accel.hmhsa_core),
        "hmhsa_shifts": ("hal", _hmhsa_core_shifts),
    }
    try:
        from halluvit_jax.layers.kernels import hmhsa_pallas

        out["hmhsa_pallas"] = ("hal", hmhsa_pallas.hmhsa_core)
    except ImportError:
        pass
    return out


def hal_param_shapes(hr: int, variant: str) -> dict[str, tuple[int, ...]]:
    """The shapes of the IHH/CHH weights that ``variant`` uses, for ``hr`` real heads."""
    shapes = {"ihh_kernel": (hr, 3, 3), "ihh_bias": (hr,), "chh_kernel": (hr, hr), "chh_bias": (hr,)}
    return {name: shape for name, shape in shapes.items() if name.split("_")[0] in variant}


def hlo_counts(text: str) -> dict[str, int]:
    """Copies, transposes, fusions (calls in any computation) and custom calls of an optimized HLO."""
    ops = re.findall(r"=\s*[\w\[\]{},:.\s()/#*-]*?\s(copy|transpose|fusion|custom-call)\(", text)
    return {name: ops.count(name) for name in ("copy", "transpose", "fusion", "custom-call")}


def measure(shape: str, name: str, *, batch: int, variant: str, inputs: str, backward: bool,
            topology: str, dtype: str = "bfloat16") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from halluvit_jax.layers.attention import mhsa as plain_mhsa

    n, nk, grid, prefix, c, h = SHAPES[shape]
    d, hr = c // h, h // 2
    kind, core = candidates()[name]
    dt = jnp.dtype(dtype)
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    sharding = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    # Row-major entry layouts: left to itself XLA:TPU picks entry layouts per program (batch
    # minor, say), which would charge layout copies to a kernel that the model never pays.
    from jax.experimental.layout import Format, Layout

    fmt = lambda nd: Format(Layout(tuple(range(nd))), sharding)  # noqa: E731
    sds = lambda *s: jax.ShapeDtypeStruct(s, dt, sharding=fmt(len(s)))  # noqa: E731
    static = dict(variant=variant, kv_grid=grid, num_prefix_tokens=prefix)
    hal_params = {name: sds(*shape) for name, shape in hal_param_shapes(hr, variant).items()}
    reduced = nk != n
    if inputs == "qkv":  # flat [B, tokens, heads * d] as the projections write them
        qk_heads = h if kind == "mhsa" else hr
        args = [sds(batch, n, qk_heads * d), sds(batch, nk, qk_heads * d), sds(batch, nk, h * d)]
        heads = lambda t, hs: t.reshape(t.shape[0], t.shape[1], hs, d)  # noqa: E731
        if kind == "hal":
            args.append(hal_params)

            def fn(q, k, v, p):
                out = core(heads(q, hr), heads(k, hr), heads(v, h), p, **static)
                return out.reshape(batch, n, c)
        else:
            def fn(q, k, v):
                return core(heads(q, h), heads(k, h), heads(v, h)).reshape(batch, n, c)
    else:  # x and the projection weights (+ the reduced key tokens)
        from halluvit_jax.layers.attention import hmhsa_on_core, per_head_views

        wq = c if kind == "mhsa" else c // 2
        p = {"proj": {"kernel": sds(c, c), "bias": sds(c)}}
        if reduced:
            p["q"] = {"kernel": sds(c, wq), "bias": sds(wq)}
            p["kv"] = {"kernel": sds(c, wq + c), "bias": sds(wq + c)}
        else:
            p["qkv"] = {"kernel": sds(c, 2 * wq + c), "bias": sds(2 * wq + c)}
        args = [p, sds(batch, n, c)] + ([sds(batch, nk, c)] if reduced else [])
        views = lambda p: per_head_views(p, (wq, wq, c), d)  # noqa: E731  (as the layers do)
        if kind == "mhsa":
            mhsa_kw = {} if name == "mhsa_dpa" else {"hook": lambda a: a}  # einsum path
            fn = lambda p, x, kv=None: plain_mhsa(views(p), x, kv, num_heads=h, **mhsa_kw)  # noqa: E731
        else:
            args[0] = {**p, **hal_params}
            fn = lambda p, x, kv=None: hmhsa_on_core(  # noqa: E731
                core, views(p), x, kv, num_heads=h, **static)
    if backward:
        fwd = fn

        def fn(*a):
            out, vjp = jax.vjp(fwd, *a[:-1])
            return vjp(a[-1])

        out_shape = jax.eval_shape(fwd, *args)
        args.append(jax.ShapeDtypeStruct(out_shape.shape, out_shape.dtype,
                                         sharding=fmt(len(out_shape.shape))))
    out_formats = jax.tree.map(lambda o: fmt(len(o.shape)), jax.eval_shape(fn, *args))
    t0 = time.perf_counter()
    compiled = jax.jit(fn, out_shardings=out_formats).lower(*args).compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    return {"shape": shape, "core": name, "variant": variant if kind == "hal" else None,
            "inputs": inputs, "pass": "fwd+bwd" if backward else "fwd", "batch": batch,
            "gbytes": cost["bytes accessed"] / 1e9, "gflops": cost["flops"] / 1e9,
            "temp_mib": mem.temp_size_in_bytes / 2**20, "compile_s": round(seconds, 2),
            **hlo_counts(compiled.as_text())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="deit_s,pvt_b1_s1")
    parser.add_argument("--cores", default="mhsa_einsum,mhsa_dpa,hmhsa_plain,hmhsa_xla,hmhsa_shifts,hmhsa_pallas")
    parser.add_argument("--variants", default="ihh_chh")
    parser.add_argument("--inputs", default="qkv", choices=("qkv", "x"))
    parser.add_argument("--passes", default="fwd,fwd+bwd")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--json", help="write the rows to this JSON file (rewritten after each row)")
    parser.add_argument("--debug", action="store_true")
    a = parser.parse_args(argv)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        print("error: libtpu is not installed; pip install 'jax[tpu]' matching your jax",
              file=sys.stderr)
        return 1
    import run_info

    report = {**run_info.header("attention_core_tpu", __file__, argv), "topology": a.topology,
              "dtype": "bfloat16", "rows": []}
    rows = report["rows"]
    try:
        known = candidates()
        for shape in a.shapes.split(","):
            for name in a.cores.split(","):
                if name not in known:
                    raise ValueError(f"unknown core {name!r}; known: {sorted(known)}")
                variants = a.variants.split(",") if known[name][0] == "hal" else ["-"]
                for variant in variants:
                    for p in a.passes.split(","):
                        row = measure(shape, name, batch=a.batch, variant=variant,
                                      inputs=a.inputs, backward=p == "fwd+bwd",
                                      topology=a.topology)
                        rows.append(row)
                        print(f"{shape:13s} {name:13s} {str(row['variant']):8s} {row['pass']:8s} "
                              f"{row['gbytes']:7.3f} GB {row['gflops']:8.2f} GFLOP "
                              f"copy {row['copy']:3d} transpose {row['transpose']:3d} "
                              f"fusion {row['fusion']:3d} custom {row['custom-call']:2d} "
                              f"temp {row['temp_mib']:8.1f} MiB", flush=True)
                        if a.json:  # a run stopped (or failed) later keeps its finished rows
                            run_info.write_json(a.json, report)
    except Exception as e:  # noqa: BLE001
        if a.debug:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
