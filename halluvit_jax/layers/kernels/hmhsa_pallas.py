"""hMHSA's attention core as one Pallas kernel per query block (TPU/Mosaic; ``interpret=True``
on any backend), forward and backward.

Per (batch element, block of ``tq`` query rows), with the whole key row in the block (``Nk``
padded to a multiple of 128 lanes inside the call):

    real_j = (q'_j k'_j^T) / sqrt(d)           j < hr     (MXU, float32 accumulation)
    hal    = CHH / IHH of real, as the variant says        (VPU: lane rolls x column weights)
    attn_j = softmax(logits_j)  per head, real and hallucinated separately
    out_j  = attn_j v_j                                      (MXU)

so HBM sees only q' and k' (``C/2`` wide), v and the output (``C`` wide), and a few ``[*, Nk]``
tables of IHH/CHH weights; logits and maps stay in VMEM. IHH's 3x3 taps are rolls of the key
axis by ``dy * Wk + dx`` times per-column weights that are 0 where a tap crosses a grid edge
or lands on a prefix column (`halluvit_jax.layers.attention_accel.ihh_coefficients`), so the
wrap-around of a roll is never read.

The backward kernel recomputes the maps from q', k', v (flash-attention style, nothing but the
inputs is kept) and writes dq', and accumulates dk', dv and the per-column partial gradients of
the IHH/CHH weights over the query blocks of a batch element; the weights' gradients are
reduced and mapped back to ``ihh_kernel``/``ihh_bias``/``chh_kernel``/``chh_bias`` outside the
kernel by autodiff of the (tiny) table construction.

Inputs/outputs are token-major ``[B, N, heads, d]`` like the plain core; inside the call they
are viewed as ``[B, N, heads * d]`` (free reshapes), so no layout transpose touches HBM.
"""

from __future__ import annotations

import copy
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from halluvit_jax.layers.attention_accel import ihh_coefficients, tap_offsets

LANES = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def query_block(n: int, cap: int = 1024) -> int:
    """Rows per query block: all of them up to ``cap``, else the largest multiple of 8 <=
    ``min(512, cap)`` dividing ``n``, else ``min(256, cap)`` (the last block is then partial and
    its padding rows masked)."""
    if n <= cap:
        return n
    top = min(512, cap) // 8 * 8
    for t in range(top, 7, -8):
        if n % t == 0:
            return t
    return min(256, top)


# The backward kernel keeps about ten float32 ``[tq, Nkp]`` maps per real head live (real and
# hallucinated logits, probabilities, their gradients, each IHH stage's input); at 784 rows and
# 3 real heads (NextViT-S stage 1) that overflowed TPU v5e's scoped VMEM. Its query blocks are
# capped at this many rows per real head.
BWD_ROWS_PER_HEAD = 768


def backward_block(n: int, hr: int) -> int:
    """Rows per query block of the backward kernel (see `BWD_ROWS_PER_HEAD`)."""
    return query_block(n, cap=max(8, BWD_ROWS_PER_HEAD // hr))


class _Static:
    """What the kernels know at trace time (``tq``: the forward's query block, ``tq_bwd``: the
    backward's)."""

    def __init__(self, *, variant, offsets, hr, d, nk, nkp, n, tq, tq_bwd, interpret):
        self.variant, self.offsets, self.hr, self.d = variant, offsets, hr, d
        self.nk, self.nkp, self.n, self.tq, self.interpret = nk, nkp, n, tq, interpret
        self.tq_bwd = tq_bwd

    def for_backward(self) -> "_Static":
        """The same, with the backward's query block as ``tq``."""
        out = copy.copy(self)
        out.tq = self.tq_bwd
        return out

    @property
    def stages(self) -> tuple[str, ...]:
        return () if self.variant == "copy" else tuple(self.variant.split("_"))


def _shift(a, off: int, nkp: int):
    """``out[:, m] = a[:, m + off]`` (cyclic over the padded key axis; callers zero the
    wrapped columns by their weights)."""
    if off == 0:
        return a
    return pltpu.roll(a, (-off) % nkp, 1)


def _ihh(maps, coef_ref, add_ref, keep, st):
    outs = []
    for j, a in enumerate(maps):
        out = a * keep + add_ref[pl.ds(j, 1), :]
        for s, off in enumerate(st.offsets):
            out = out + coef_ref[pl.ds(j * 9 + s, 1), :] * _shift(a, off, st.nkp)
        outs.append(out)
    return outs


def _chh(maps, chk_ref, chb_ref, st):
    hr = st.hr
    return [sum((maps[h] * chk_ref[h * hr + g] for h in range(hr)), chb_ref[g]) for g in range(hr)]


def _hal_forward(real, coef_ref, add_ref, keep, chk_ref, chb_ref, st):
    """Hallucinated logits (list of hr ``[tq, Nkp]`` f32 maps) and each stage's input."""
    maps, inputs = real, []
    for stage in st.stages:
        inputs.append(maps)
        if stage == "ihh":
            maps = _ihh(maps, coef_ref, add_ref, keep, st)
        else:
            maps = _chh(maps, chk_ref, chb_ref, st)
    return maps, inputs


def _real_logits(q, k, st):
    scale = 1.0 / math.sqrt(st.d)
    out = []
    for j in range(st.hr):
        qj, kj = q[:, j * st.d:(j + 1) * st.d], k[:, j * st.d:(j + 1) * st.d]
        s = jax.lax.dot_general(qj, kj, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        out.append(s * scale)
    return out


def _key_rows(ref, st):
    """A ``[Nkp, w]`` key-side block with the rows past ``Nk`` (outside the array: undefined
    memory) zeroed."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (st.nkp, 1), 0)
    return jnp.where(rows < st.nk, ref[...], 0).astype(ref.dtype)


def _column_valid(st):
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, st.nkp), 1)
    return cols < st.nk


def _probs(logits, valid):
    """Softmax of one head's ``[tq, Nkp]`` logits over the real key columns, float32."""
    x = jnp.where(valid, logits, -jnp.inf)
    e = jnp.exp(x - jnp.max(x, axis=1, keepdims=True))
    return e / jnp.sum(e, axis=1, keepdims=True)


def _fwd_kernel(coef_ref, add_ref, keep_ref, chk_ref, chb_ref, q_ref, k_ref, v_ref, o_ref, *, st):
    keep = keep_ref[...]
    valid = _column_valid(st)
    v = _key_rows(v_ref, st)
    real = _real_logits(q_ref[...], _key_rows(k_ref, st), st)
    hal, _ = _hal_forward(real, coef_ref, add_ref, keep, chk_ref, chb_ref, st)
    outs = []
    for j, logits in enumerate(real + hal):
        p = _probs(logits, valid).astype(v.dtype)
        outs.append(jnp.dot(p, v[:, j * st.d:(j + 1) * st.d], preferred_element_type=jnp.float32))
    o_ref[...] = jnp.concatenate(outs, axis=1).astype(o_ref.dtype)


def _bwd_kernel(coef_ref, add_ref, keep_ref, chk_ref, chb_ref, q_ref, k_ref, v_ref, g_ref,
                dq_ref, dk_ref, dv_ref, dcoef_ref, dadd_ref, dchk_ref, dchb_ref, *, st):
    qi = pl.program_id(1)

    @pl.when(qi == 0)
    def _init():
        for ref in (dk_ref, dv_ref, dcoef_ref, dadd_ref, dchk_ref, dchb_ref):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    hr, d, nkp = st.hr, st.d, st.nkp
    keep = keep_ref[...]
    valid = _column_valid(st)
    rows = jax.lax.broadcasted_iota(jnp.int32, (st.tq, 1), 0) + qi * st.tq
    row_ok = rows < st.n  # a partial last block's padding rows
    q = jnp.where(row_ok, q_ref[...], 0).astype(q_ref.dtype)  # padding rows may hold NaNs
    k, v = _key_rows(k_ref, st), _key_rows(v_ref, st)
    real = _real_logits(q, k, st)
    hal, stage_inputs = _hal_forward(real, coef_ref, add_ref, keep, chk_ref, chb_ref, st)
    g = jnp.where(row_ok, g_ref[...], 0).astype(v.dtype)
    dlogits = []
    for j, logits in enumerate(real + hal):
        p = jnp.where(row_ok, _probs(logits, valid), 0.0)
        gj = g[:, j * d:(j + 1) * d]
        vj = v[:, j * d:(j + 1) * d]
        dv = jax.lax.dot_general(p.astype(gj.dtype), gj, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        dv_ref[:, pl.ds(j * d, d)] += dv.astype(dv_ref.dtype)
        dp = jax.lax.dot_general(gj, vj, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        dlogits.append(p * (dp - jnp.sum(p * dp, axis=1, keepdims=True)))
    dreal, dmaps = dlogits[:hr], dlogits[hr:]
    # Back through the hallucination stages, last first.
    for stage, maps in zip(reversed(st.stages), reversed(stage_inputs)):
        if stage == "ihh":
            new = []
            for j, (a, dout) in enumerate(zip(maps, dmaps)):
                da = dout * keep
                dadd_ref[pl.ds(j, 1), :] += jnp.sum(dout, axis=0, keepdims=True)
                for s, off in enumerate(st.offsets):
                    c = coef_ref[pl.ds(j * 9 + s, 1), :]
                    dcoef_ref[pl.ds(j * 9 + s, 1), :] += jnp.sum(
                        dout * _shift(a, off, nkp), axis=0, keepdims=True)
                    da = da + _shift(c * dout, -off, nkp)
                new.append(da)
            dmaps = new
        else:
            for h in range(hr):
                for g_ in range(hr):
                    dchk_ref[pl.ds(h * hr + g_, 1), :] += jnp.sum(
                        maps[h] * dmaps[g_], axis=0, keepdims=True)
            for g_ in range(hr):
                dchb_ref[pl.ds(g_, 1), :] += jnp.sum(dmaps[g_], axis=0, keepdims=True)
            dmaps = [sum(dmaps[g_] * chk_ref[h * hr + g_] for g_ in range(hr)) for h in range(hr)]
    scale = 1.0 / math.sqrt(d)
    dqs = []
    for j in range(hr):
        ds = jnp.where(valid, dreal[j] + dmaps[j], 0.0) * scale
        qj, kj = q[:, j * d:(j + 1) * d], k[:, j * d:(j + 1) * d]
        dqs.append(jnp.dot(ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32))
        dk = jax.lax.dot_general(ds.astype(qj.dtype), qj, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        dk_ref[:, pl.ds(j * d, d)] += dk.astype(dk_ref.dtype)
    dq_ref[...] = jnp.concatenate(dqs, axis=1).astype(dq_ref.dtype)


def _tables(params, variant, kv_grid, num_prefix_tokens, hr, nk, nkp):
    """The IHH column tables ``coef`` ``[hr*9, Nkp]``, ``add`` ``[hr, Nkp]``, ``keep``
    ``[1, Nkp]`` and the CHH scalars ``[hr*hr]``, ``[hr]`` (float32; zeros where unused)."""
    pad = ((0, 0), (0, nkp - nk))
    if "ihh" in variant:
        coef, add, keep = ihh_coefficients(params["ihh_kernel"], params["ihh_bias"], kv_grid,
                                           num_prefix_tokens, nk)
        coef = jnp.pad(coef.reshape(hr * 9, nk), pad)
        add, keep = jnp.pad(add, pad), jnp.pad(keep[None], pad)
    else:
        coef, add = jnp.zeros((hr * 9, nkp), jnp.float32), jnp.zeros((hr, nkp), jnp.float32)
        keep = jnp.zeros((1, nkp), jnp.float32)
    if "chh" in variant:
        chk = params["chh_kernel"].astype(jnp.float32).reshape(hr * hr)
        chb = params["chh_bias"].astype(jnp.float32)
    else:
        chk, chb = jnp.zeros((hr * hr,), jnp.float32), jnp.zeros((hr,), jnp.float32)
    return coef, add, keep, chk, chb


def _specs(st, b_dims):
    """BlockSpecs: tables (whole, VMEM), CHH scalars (SMEM), then per-batch operands."""
    whole = lambda shape: pl.BlockSpec(shape, lambda b, i: (0,) * len(shape))  # noqa: E731
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    tables = [whole((st.hr * 9, st.nkp)), whole((st.hr, st.nkp)), whole((1, st.nkp)), smem, smem]
    q_like = lambda w: pl.BlockSpec((None, st.tq, w), lambda b, i: (b, i, 0))  # noqa: E731
    k_like = lambda w: pl.BlockSpec((None, st.nkp, w), lambda b, i: (b, 0, 0))  # noqa: E731
    return tables, q_like, k_like


def _cost(st, b, cq, cv, itemsize, backward):
    """What the kernel does, for XLA's cost analysis: MXU flops over the real ``Nk`` keys
    (QK^T, attn V; the backward pass recomputes them and adds dV, dP, dQ, dK), the
    hallucination's multiply-adds and the softmax exps; HBM bytes of its operands."""
    rows = b * st.n * st.nk
    mxu = 2 * rows * (cq + cv)
    taps = 2 * 9 * st.hr * ("ihh" in st.variant) + 2 * st.hr * st.hr * ("chh" in st.variant)
    flops = mxu + rows * taps
    io = itemsize * (b * st.n * (cq + cv) + b * st.nk * (cq + cv))
    if backward:
        flops = 3 * flops + 2 * rows * (cq + cv)
        io += itemsize * b * st.n * (cq + cv) + 4 * b * st.nk * (cq + cv)
    return pl.CostEstimate(flops=flops, transcendentals=rows * 2 * st.hr, bytes_accessed=io)


def _call_fwd(tables, q, k, v, st):
    b = q.shape[0]
    tspecs, q_like, k_like = _specs(st, b)
    cq, cv = q.shape[2], v.shape[2]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(b, pl.cdiv(st.n, st.tq)),
        in_specs=tspecs + [q_like(cq), k_like(cq), k_like(cv)],
        out_specs=q_like(cv),
        out_shape=jax.ShapeDtypeStruct((b, st.n, cv), v.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=st.interpret,
        cost_estimate=_cost(st, b, cq, cv, q.dtype.itemsize, backward=False),
        name="hmhsa_fwd",
    )(*tables, q, k, v)


def _call_bwd(tables, q, k, v, g, st):
    b = q.shape[0]
    tspecs, q_like, k_like = _specs(st, b)
    cq, cv = q.shape[2], v.shape[2]
    f32 = jnp.float32
    per_b = lambda rows: pl.BlockSpec((None, rows, st.nkp), lambda b, i: (b, 0, 0))  # noqa: E731
    hr = st.hr
    return pl.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        grid=(b, pl.cdiv(st.n, st.tq)),
        in_specs=tspecs + [q_like(cq), k_like(cq), k_like(cv), q_like(cv)],
        out_specs=[q_like(cq), k_like(cq), k_like(cv), per_b(hr * 9), per_b(hr),
                   per_b(hr * hr), per_b(hr)],
        out_shape=[jax.ShapeDtypeStruct((b, st.n, cq), q.dtype),
                   jax.ShapeDtypeStruct((b, st.nk, cq), f32),
                   jax.ShapeDtypeStruct((b, st.nk, cv), f32),
                   jax.ShapeDtypeStruct((b, hr * 9, st.nkp), f32),
                   jax.ShapeDtypeStruct((b, hr, st.nkp), f32),
                   jax.ShapeDtypeStruct((b, hr * hr, st.nkp), f32),
                   jax.ShapeDtypeStruct((b, hr, st.nkp), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=st.interpret,
        cost_estimate=_cost(st, b, cq, cv, q.dtype.itemsize, backward=True),
        name="hmhsa_bwd",
    )(*tables, q, k, v, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(tables, q, k, v, st):
    return _call_fwd(tables, q, k, v, st)


def _core_fwd(tables, q, k, v, st):
    return _call_fwd(tables, q, k, v, st), (tables, q, k, v)


def _core_bwd(st, res, g):
    tables, q, k, v = res
    dq, dk, dv, dcoef, dadd, dchk, dchb = _call_bwd(tables, q, k, v, g, st.for_backward())
    coef, add, keep, chk, chb = tables
    dtables = (jnp.sum(dcoef, 0), jnp.sum(dadd, 0), jnp.zeros_like(keep),
               jnp.sum(dchk, (0, 2)), jnp.sum(dchb, (0, 2)))
    return dtables, dq, dk.astype(k.dtype), dv.astype(v.dtype)


_core.defvjp(_core_fwd, _core_bwd)


def hmhsa_core(q, k, v, params, *, variant: str, kv_grid, num_prefix_tokens: int,
               interpret: bool = False, block_q: int | None = None):
    """hMHSA's attention core (`halluvit_jax.layers.attention_accel.hmhsa_core`'s contract) as
    Pallas kernels; ``block_q`` fixes both kernels' query block (tests). ``q`` ``[B, N, hr,
    d]``, ``k`` ``[B, Nk, hr, d]``, ``v`` ``[B, Nk, h, d]`` -> ``[B, N, h, d]``; differentiable
    in all of them and in ``params`` (custom VJP with a recomputing backward kernel).
    ``interpret=True`` runs the kernels in Pallas' interpreter (any backend)."""
    b, n, hr, d = q.shape
    nk, h = k.shape[1], v.shape[2]
    if h != 2 * hr:
        raise ValueError(f"hMHSA core: v has {h} heads, q' {hr}; v needs twice as many.")
    if variant not in ("copy", "ihh", "chh", "ihh_chh", "chh_ihh"):
        raise ValueError(f"Unknown hMHSA variant {variant!r}.")
    nkp = _round_up(nk, LANES)
    if nkp > 512:
        raise ValueError(f"The Pallas hMHSA core keeps a whole key row in VMEM: Nk={nk} > 512.")
    offsets = tap_offsets(kv_grid) if "ihh" in variant else ()
    st = _Static(variant=variant, offsets=offsets, hr=hr, d=d, nk=nk, nkp=nkp, n=n,
                 tq=block_q or query_block(n), tq_bwd=block_q or backward_block(n, hr),
                 interpret=interpret)
    tables = _tables(params, variant, kv_grid, num_prefix_tokens, hr, nk, nkp)
    kf, vf = k.reshape(b, nk, hr * d), v.reshape(b, nk, h * d)
    out = _core(tables, q.reshape(b, n, hr * d), kf, vf, st)
    return out.reshape(b, n, h, d)
