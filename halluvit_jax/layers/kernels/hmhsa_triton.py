"""hMHSA's attention core as Pallas kernels for GPUs (Triton lowering; ``interpret=True`` on any
backend), forward and backward: flash-attention style, with the hallucination on the keys.

The hallucination is affine in the logits and acts along the key axis only
(`halluvit_jax.layers.attention_accel`), so every hallucinated head is a sum of dot products of
the real queries with transformed keys, plus a per-column constant:

    real_j = q'_j K_j^T                                   (K_j = k'_j)
    hal_g  = sum_t  c_t * (q'_{h_t} K_t^T)  +  bias_g     (the terms ``t`` of head ``g``)

with ``K_t`` one of ``k'_h`` (``copy``, ``chh``), ``T_h(k'_h)`` (IHH's 3x3 convolution of the
keys' grid: ``ihh``, ``ihh_chh``) or ``T_g(chh[h, g] k'_h)`` (``chh_ihh``), ``c_t`` a CHH weight
(or 1), and ``bias`` `attention_accel.hal_bias` (``[hr, Nk]``: IHH's and CHH's biases and the
zero padding at the grid's edges). The transformed keys and the bias are built outside the kernel
with stock ops (they are ``Nk``-sized) and differentiated there by autodiff; the kernels see only
matmuls, a per-column bias and the softmax, all of it local to a block of key columns:

- forward, one program per (image, block of ``tq`` query rows), the whole key row (``Nk``
  padded to a power of two, at most 256) in the block: every head's logits, softmax and
  ``attn @ v``; writes the output and each row's log-sum-exp (float32, ``[B, h, N]``);
- backward ``dq``, one program per (image, query block), stepping over the key row: the maps
  recomputed from the log-sum-exp, ``dq' = sum_t dS_t K_t``;
- backward ``dk``/``dv``, one program per (image, block of ``tk`` keys), looping over the query
  blocks: ``dK_t``, ``dv``, and per-column partial sums for ``bias`` and the CHH weights.

HBM sees q', the keys (``k'`` and the transformed keys), v, the output and small float32 row
and column vectors; no ``[N, Nk]`` map is written. Loads and stores past the ends of the token
axes and of the head dim are masked, so tiles are powers of two (Triton's rule) whatever ``N``,
``Nk`` and ``d`` are (PVTv2-b1-hal's 80-channel heads run as tiles of 128). Every program holds
all real heads (CHH mixes them), so `supports` takes at most `MAX_REAL_HEADS` of them.

The kernels have been lowered for CUDA (the tests export them) and checked against the plain
path in the interpreter; they have not run on a GPU in this project yet (docs/benchmarks.md),
which is why ``impl="auto"`` does not pick them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from halluvit_jax.layers.attention_accel import chh_ihh_keys, hal_bias, ihh_keys

VARIANTS = ("copy", "ihh", "chh", "ihh_chh", "chh_ihh")
MAX_KEYS = 256  # the forward keeps a whole (padded) key row of every head in registers
# Every program holds all real heads' maps (CHH mixes them); past this many real heads the
# kernels spill heavily for sm_90 (NextViT-S's 6 and 12: tens of KB per thread,
# benchmarks/triton_compile.py), and `supports` says no.
MAX_REAL_HEADS = 4
# The custom call the kernels lower to; `jax.export` refuses it unless told
# (``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALL)]``).
CUSTOM_CALL = "__gpu$xla.gpu.triton"


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Plan:
    """The static shape of one core: which dot products (``dots``: ``(query head, key array,
    key head)``), which terms make each hallucinated head (``terms[g]``: ``(dot, coefficient
    index or None)``), block sizes."""

    def __init__(self, *, variant, hr, d, n, nk, tq=None, tq_dkv=None, tk=None):
        self.variant, self.hr, self.d, self.n, self.nk = variant, hr, d, n, nk
        self.dp = max(16, _pow2(d))  # head dim of the tiles (the rest masked)
        self.nkp = max(16, _pow2(nk))
        # Key arrays (`hmhsa_core`): k' (hr heads), then the transformed keys, if any.
        self.key_heads = (hr,)
        self.dots = [(j, 0, j) for j in range(hr)]  # real heads
        if variant == "copy":
            self.terms = [[(g, None)] for g in range(hr)]
        elif variant == "chh":
            self.terms = [[(h, h * hr + g) for h in range(hr)] for g in range(hr)]
        elif variant in ("ihh", "ihh_chh"):
            self.key_heads += (hr,)
            self.dots += [(h, 1, h) for h in range(hr)]
            if variant == "ihh":
                self.terms = [[(hr + g, None)] for g in range(hr)]
            else:
                self.terms = [[(hr + h, h * hr + g) for h in range(hr)] for g in range(hr)]
        else:  # chh_ihh: key head g * hr + h of array 1 is T_g(chh[h, g] k'_h)
            self.key_heads += (hr * hr,)
            self.dots += [(h, 1, g * hr + h) for g in range(hr) for h in range(hr)]
            self.terms = [[(hr + g * hr + h, None) for h in range(hr)] for g in range(hr)]
        self.ncoef = max(1, _pow2(hr * hr))
        # Block sizes, checked by compiling every kernel of DeiT-S-, PVTv2-b1- and NextViT-S-hal
        # for sm_80, sm_86 and sm_90 (benchmarks/triton_compile.py: shared memory, registers,
        # spills). Forward: a whole key row of every head per program; query rows enough for
        # the tensor cores (>= 16), few enough that the float32 maps fit.
        cap = 1 << max(4, (16384 // (hr * self.nkp)).bit_length() - 1)
        self.tq = tq or max(16, min(64, _pow2(n), cap))
        self.warps = 8 if hr * self.tq * self.nkp >= 8192 else 4
        # The dq kernel steps over the key row tk_dq columns at a time, unpipelined, with query
        # blocks that shrink as heads and head dims grow. With the whole row, 64 query rows of
        # 256 keys needed 432 KiB of shared memory and 16 rows still 212 KiB (an A100 has 163,
        # an A10 99); now DeiT-S-hal's needs 70.
        self.tk_dq = min(64, self.nkp)
        cap = 1 << max(4, (4096 * 64 // (hr * self.tk_dq * max(64, self.dp))).bit_length() - 1)
        self.tq_dq = tq or max(16, min(64, _pow2(n), cap))
        self.warps_dq = 8 if hr * self.tq_dq * self.tk_dq >= 4096 else 4
        # dk/dv kernel: blocks of tk keys, stepping over the queries tq_dkv rows at a time; its
        # accumulators (dK, dv of every head) grow with the heads.
        self.tq_dkv = tq_dkv or 16
        self.tk = tk or (32 if hr == 1 else 16)
        self.warps_dkv = 8
        self.nq = -(-n // self.tq)

    @property
    def mixes(self) -> bool:
        return self.variant in ("chh", "ihh_chh")


def _i(index: int) -> jax.Array:
    """A static index into a ref, as a traced scalar (what both the Triton lowering and the
    interpreter take)."""
    return jnp.int32(index)


def _dots(q, key, plan):
    """Every dot product of `_Plan.dots`: ``q`` per query head ``[rows, d]``, ``key(a, c)``
    ``[cols, d]`` (`_key_loader`)."""
    return [plgpu.dot(q[h], key(a, c), trans_b=True) for h, a, c in plan.dots]


def _tile(ok, plan):
    """The mask of a ``[tokens, dp]`` tile: token rows ``ok``, the head dim's first ``d``."""
    return ok[:, None] & (jnp.arange(plan.dp) < plan.d)[None, :]


def _key_loader(key_refs, rows, valid, plan):
    """``load(a, c)``: head ``c`` of key array ``a`` at ``rows`` of the block (``[cols, d]``,
    rows past ``Nk`` zero), loaded where it is used rather than held: a whole key row of every
    head would not fit the registers."""
    return lambda a, c: plgpu.load(key_refs[a].at[rows, _i(c), :], mask=_tile(valid, plan), other=0.0)


def _query_block(q_ref, tq, plan):
    """The valid rows of a program's block of ``tq`` query rows and each real head's ``q'``
    tile."""
    row_ok = pl.program_id(1) * tq + jnp.arange(tq) < plan.n
    return row_ok, [plgpu.load(q_ref.at[:, _i(h), :], mask=_tile(row_ok, plan), other=0.0)
                    for h in range(plan.hr)]


def _columns(bias_ref, start, size, plan):
    """Key columns ``start + [0, size)``: which are keys (not padding), and each hallucinated
    head's bias there."""
    col_ok = start + jnp.arange(size) < plan.nk
    return col_ok, [bias_ref[_i(g), pl.ds(start, size)] for g in range(plan.hr)]


def _fwd_kernel(coef_ref, bias_ref, q_ref, *refs, plan):
    *key_refs, v_ref, o_ref, lse_ref = refs
    hr = plan.hr
    row_ok, q = _query_block(q_ref, plan.tq, plan)
    col_ok, bias = _columns(bias_ref, 0, plan.nkp, plan)
    dots = _dots(q, _key_loader(key_refs, slice(None), col_ok, plan), plan)
    for j in range(2 * hr):
        s = dots[j] if j < hr else _hal_logit(j - hr, dots, coef_ref, bias, plan)
        s = jnp.where(col_ok[None, :], s, -jnp.inf)
        m = jnp.max(s, axis=1)
        e = jnp.exp(s - m[:, None])
        total = jnp.sum(e, axis=1)
        v = _v_loader(v_ref, slice(None), col_ok, plan)(j)
        o = plgpu.dot((e / total[:, None]).astype(v.dtype), v)
        plgpu.store(o_ref.at[:, _i(j), :], o.astype(o_ref.dtype), mask=_tile(row_ok, plan))
        plgpu.store(lse_ref.at[_i(j), :], m + jnp.log(total), mask=row_ok)


def _hal_logit(g, dots, coef_ref, bias, plan):
    """Hallucinated head ``g``'s logits from the dot products (float32)."""
    acc = bias[g]
    for t, c in plan.terms[g]:
        acc = acc + (dots[t] if c is None else dots[t] * coef_ref[_i(c)])
    return acc


def _v_loader(v_ref, rows, valid, plan):
    """``load(j)``: head ``j`` of ``v`` at ``rows`` of the block (``[cols, d]``, rows past ``Nk``
    zero), at its use."""
    return lambda j: plgpu.load(v_ref.at[rows, _i(j), :], mask=_tile(valid, plan), other=0.0)


def _backward_heads(dots, coef_ref, bias, lse, delta, do, v, ok, plan, on_probs=None):
    """Each head's softmax recomputed from the forward's log-sum-exp, then ``dS = P * (dO V^T -
    rowsum(dO * O))``; returns the gradient of every dot product (back through the
    hallucination) and each hallucinated head's ``dS``. One head at a time, so that few
    ``[rows, cols]`` maps are live; ``on_probs(j, p)`` sees each head's probabilities."""
    hr = plan.hr
    ddots = [None] * len(plan.dots)
    dhal = []

    def add(t, part):
        ddots[t] = part if ddots[t] is None else ddots[t] + part

    for j in range(2 * hr):
        s = dots[j] if j < hr else _hal_logit(j - hr, dots, coef_ref, bias, plan)
        p = jnp.where(ok, jnp.exp(s - lse[j][:, None]), 0.0)
        if on_probs is not None:
            on_probs(j, p)
        ds = p * (plgpu.dot(do[j], v(j), trans_b=True) - delta[j][:, None])
        if j < hr:
            add(j, ds)
            continue
        dhal.append(ds)
        for t, c in plan.terms[j - hr]:
            add(t, ds if c is None else ds * coef_ref[_i(c)])
    return ddots, dhal


def _row_vectors(ref, rows, row_ok, n):
    return [plgpu.load(ref.at[_i(j), rows], mask=row_ok, other=0.0) for j in range(n)]


def _dq_kernel(coef_ref, bias_ref, q_ref, *refs, plan):
    """``dq'`` of a block of query rows, stepping over the key row ``tk_dq`` columns at a time
    (the maps of one step are ``[tq, tk_dq]``; the forward's log-sum-exp makes each step's
    softmax exact)."""
    *key_refs, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    hr, tk = plan.hr, plan.tk_dq
    row_ok, q = _query_block(q_ref, plan.tq_dq, plan)
    do = [plgpu.load(do_ref.at[:, _i(j), :], mask=_tile(row_ok, plan), other=0.0) for j in range(2 * hr)]
    lse = _row_vectors(lse_ref, slice(None), row_ok, 2 * hr)
    delta = _row_vectors(delta_ref, slice(None), row_ok, 2 * hr)

    def body(i, dq):
        cols = pl.ds(i * tk, tk)
        col_ok, bias = _columns(bias_ref, i * tk, tk, plan)
        key = _key_loader(key_refs, cols, col_ok, plan)
        ddots, _ = _backward_heads(_dots(q, key, plan), coef_ref, bias, lse, delta, do,
                                   _v_loader(v_ref, cols, col_ok, plan),
                                   row_ok[:, None] & col_ok[None, :], plan)
        dq = list(dq)
        for (h, a, c), dt in zip(plan.dots, ddots):
            kt = key(a, c)
            dq[h] = dq[h] + plgpu.dot(dt.astype(kt.dtype), kt)
        return dq

    dq = jax.lax.fori_loop(0, plan.nkp // tk, body, [jnp.zeros((plan.tq_dq, plan.dp), jnp.float32)] * hr)
    for h in range(hr):
        plgpu.store(dq_ref.at[:, _i(h), :], dq[h].astype(dq_ref.dtype), mask=_tile(row_ok, plan))


def _dkv_kernel(coef_ref, bias_ref, q_ref, *refs, plan):
    nkeys = len(plan.key_heads)
    key_refs, refs = refs[:nkeys], refs[nkeys:]
    v_ref, do_ref, lse_ref, delta_ref = refs[:4]
    dkey_refs, (dv_ref, dbias_ref, dcoef_ref) = refs[4:4 + nkeys], refs[4 + nkeys:]
    hr, tq, tk = plan.hr, plan.tq_dkv, plan.tk
    col_ok, bias = _columns(bias_ref, pl.program_id(1) * tk, tk, plan)
    # The key-side refs hold this program's block of keys.
    key, v = _key_loader(key_refs, slice(None), col_ok, plan), _v_loader(v_ref, slice(None), col_ok, plan)
    f32 = jnp.float32
    zeros = lambda *shape: jnp.zeros(shape, f32)  # noqa: E731
    init = ([[zeros(tk, plan.dp) for _ in range(n)] for n in plan.key_heads],
            [zeros(tk, plan.dp) for _ in range(2 * hr)], [zeros(tk) for _ in range(hr)],
            [zeros(tk) for _ in range(hr * hr if plan.mixes else 0)])

    def body(i, acc):
        dkeys, dv, dbias, dcoef = [list(x) for x in acc]
        dkeys = [list(x) for x in dkeys]
        rows = pl.ds(i * tq, tq)
        row_ok = i * tq + jnp.arange(tq) < plan.n
        q = [plgpu.load(q_ref.at[rows, _i(h), :], mask=_tile(row_ok, plan), other=0.0) for h in range(hr)]
        do = [plgpu.load(do_ref.at[rows, _i(j), :], mask=_tile(row_ok, plan), other=0.0)
              for j in range(2 * hr)]
        dots = _dots(q, key, plan)

        def on_probs(j, p):
            dv[j] = dv[j] + plgpu.dot(p.astype(do[j].dtype), do[j], trans_a=True)

        ddots, dhal = _backward_heads(
            dots, coef_ref, bias, _row_vectors(lse_ref, rows, row_ok, 2 * hr),
            _row_vectors(delta_ref, rows, row_ok, 2 * hr), do, v,
            row_ok[:, None] & col_ok[None, :], plan, on_probs)
        for (h, a, c), dt in zip(plan.dots, ddots):
            dkeys[a][c] = dkeys[a][c] + plgpu.dot(dt.astype(q[h].dtype), q[h], trans_a=True)
        for g, ds in enumerate(dhal):
            dbias[g] = dbias[g] + jnp.sum(ds, axis=0)
            if plan.mixes:
                for t, c in plan.terms[g]:
                    dcoef[c] = dcoef[c] + jnp.sum(dots[t] * ds, axis=0)
        return dkeys, dv, dbias, dcoef

    dkeys, dv, dbias, dcoef = jax.lax.fori_loop(0, -(-plan.n // tq), body, init)
    for ref, grads in zip(dkey_refs, dkeys):
        for c, grad in enumerate(grads):
            plgpu.store(ref.at[:, _i(c), :], grad.astype(ref.dtype), mask=_tile(col_ok, plan))
    for j, grad in enumerate(dv):
        plgpu.store(dv_ref.at[:, _i(j), :], grad.astype(dv_ref.dtype), mask=_tile(col_ok, plan))
    for g, grad in enumerate(dbias):
        plgpu.store(dbias_ref.at[_i(g), :], grad)
    for c, grad in enumerate(dcoef):
        plgpu.store(dcoef_ref.at[_i(c), :], grad)


def _params(num_warps: int = 4, num_stages: int = 2):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _per_image(rows, heads, d, block_index):
    """A ``[rows, heads, d]`` block of a ``[B, tokens, heads, d]`` array (``d`` the padded head
    dim: the block may reach past the array's ends, where loads and stores are masked)."""
    return pl.BlockSpec((None, rows, heads, d), lambda b, i: (b, block_index(i), 0, 0))


def _call_fwd(coef, bias, q, keys, v, plan, interpret):
    b, hr, d, h = q.shape[0], plan.hr, plan.dp, 2 * plan.hr
    q_rows = lambda w: _per_image(plan.tq, w, d, lambda i: i)  # noqa: E731
    key_rows = lambda w: _per_image(plan.nkp, w, d, lambda i: 0)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        grid=(b, plan.nq),
        in_specs=[_whole((plan.ncoef,)), _whole((hr, plan.nkp)), q_rows(hr)]
        + [key_rows(n) for n in plan.key_heads] + [key_rows(h)],
        out_specs=[q_rows(h), pl.BlockSpec((None, h, plan.tq), lambda b, i: (b, 0, i))],
        out_shape=[jax.ShapeDtypeStruct((b, plan.n, h, plan.d), v.dtype),
                   jax.ShapeDtypeStruct((b, h, plan.n), jnp.float32)],
        compiler_params=_params(num_warps=plan.warps),
        interpret=interpret,
        name="hmhsa_fwd_triton",
    )(coef, bias, q, *keys, v)


def _call_bwd(coef, bias, q, keys, v, do, lse, delta, plan, interpret):
    b, hr, d, h = q.shape[0], plan.hr, plan.dp, 2 * plan.hr
    tq, tq_dkv = plan.tq_dq, plan.tq_dkv
    rows_dkv = -(-plan.n // tq_dkv) * tq_dkv
    nkb = -(-plan.nk // plan.tk)
    f32 = jnp.float32
    tables = [_whole((plan.ncoef,)), _whole((hr, plan.nkp))]
    q_rows = lambda w: _per_image(tq, w, d, lambda i: i)  # noqa: E731
    all_rows = lambda w: _per_image(rows_dkv, w, d, lambda i: 0)  # noqa: E731
    all_keys = lambda w: _per_image(plan.nkp, w, d, lambda i: 0)  # noqa: E731
    key_rows = lambda w: _per_image(plan.tk, w, d, lambda i: i)  # noqa: E731
    vec_rows = pl.BlockSpec((None, h, tq), lambda b, i: (b, 0, i))
    vec_all = pl.BlockSpec((None, h, rows_dkv), lambda b, i: (b, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=(b, -(-plan.n // tq)),
        in_specs=tables + [q_rows(hr)] + [all_keys(n) for n in plan.key_heads]
        + [all_keys(h), q_rows(h), vec_rows, vec_rows],
        out_specs=q_rows(hr),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(num_warps=plan.warps_dq, num_stages=1),
        interpret=interpret,
        name="hmhsa_dq_triton",
    )(coef, bias, q, *keys, v, do, lse, delta)
    col_vecs = lambda n: pl.BlockSpec((None, n, plan.tk), lambda b, i: (b, 0, i))  # noqa: E731
    ncoef = hr * hr if plan.mixes else 1
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid=(b, nkb),
        in_specs=tables + [all_rows(hr)] + [key_rows(n) for n in plan.key_heads]
        + [key_rows(h), all_rows(h), vec_all, vec_all],
        out_specs=[key_rows(n) for n in plan.key_heads] + [key_rows(h), col_vecs(hr), col_vecs(ncoef)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype) for k in keys]
        + [jax.ShapeDtypeStruct(v.shape, v.dtype),
           jax.ShapeDtypeStruct((b, hr, nkb * plan.tk), f32),
           jax.ShapeDtypeStruct((b, ncoef, nkb * plan.tk), f32)],
        compiler_params=_params(num_warps=plan.warps_dkv),
        interpret=interpret,
        name="hmhsa_dkv_triton",
    )(coef, bias, q, *keys, v, do, lse, delta)
    *dkeys, dv, dbias, dcoef = outs
    return dq, dkeys, dv, dbias, dcoef


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend(coef, bias, q, keys, v, plan, interpret):
    return _call_fwd(coef, bias, q, keys, v, plan, interpret)[0]


def _attend_fwd(coef, bias, q, keys, v, plan, interpret):
    out, lse = _call_fwd(coef, bias, q, keys, v, plan, interpret)
    return out, (coef, bias, q, keys, v, out, lse)


def _attend_bwd(plan, interpret, res, do):
    coef, bias, q, keys, v, out, lse = res
    delta = jnp.einsum("bnhd,bnhd->bhn", do.astype(jnp.float32), out.astype(jnp.float32))
    dq, dkeys, dv, dbias, dcoef = _call_bwd(coef, bias, q, keys, v, do, lse, delta, plan, interpret)
    nk = plan.nk
    dbias = jnp.pad(jnp.sum(dbias[..., :nk], axis=0), ((0, 0), (0, plan.nkp - nk)))
    dcoef_out = jnp.zeros_like(coef)
    if plan.mixes:  # otherwise the kernel leaves dcoef unwritten
        dcoef_out = dcoef_out.at[: plan.hr * plan.hr].set(jnp.sum(dcoef[..., :nk], axis=(0, 2)))
    return dcoef_out, dbias, dq, tuple(dkeys), dv


_attend.defvjp(_attend_fwd, _attend_bwd)


def supports(q_shape, k_shape) -> bool:
    """Whether the kernels take a core of these ``q'`` ``[B, N, hr, d]`` and ``k'`` ``[B, Nk,
    hr, d]`` shapes (at most `MAX_REAL_HEADS` real heads, `MAX_KEYS` keys after padding)."""
    return q_shape[2] <= MAX_REAL_HEADS and _pow2(k_shape[1]) <= MAX_KEYS


def hmhsa_core(q, k, v, params, *, variant: str, kv_grid, num_prefix_tokens: int,
               interpret: bool = False, block_q: int | None = None, block_k: int | None = None):
    """hMHSA's attention core (`halluvit_jax.layers.attention_accel.hmhsa_core`'s contract) as
    Triton kernels: ``q`` ``[B, N, hr, d]``, ``k`` ``[B, Nk, hr, d]``, ``v`` ``[B, Nk, h, d]``
    -> ``[B, N, h, d]`` (real heads first); differentiable in all of them and in ``params``.
    ``block_q``/``block_k`` fix the query and key blocks (tests); ``interpret=True`` runs the
    kernels in Pallas' interpreter (any backend)."""
    b, n, hr, d = q.shape
    nk, h = k.shape[1], v.shape[2]
    if h != 2 * hr:
        raise ValueError(f"hMHSA core: v has {h} heads, q' {hr}; v needs twice as many.")
    if variant not in VARIANTS:
        raise ValueError(f"Unknown hMHSA variant {variant!r}; choose one of {VARIANTS}.")
    if not supports(q.shape, k.shape):
        raise ValueError(f"The Triton hMHSA core takes at most {MAX_REAL_HEADS} real heads and "
                         f"{MAX_KEYS} keys, got {hr} and {nk}; use impl='accel' for this layer.")
    static = dict(kv_grid=kv_grid, num_prefix_tokens=num_prefix_tokens)
    qs = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    keys = [k]
    if variant in ("ihh", "ihh_chh"):
        keys.append(ihh_keys(k, params["ihh_kernel"], **static))
    elif variant == "chh_ihh":
        kh = chh_ihh_keys(k, params["ihh_kernel"], params["chh_kernel"], **static)  # [B,Nk,h,d,g]
        keys.append(jnp.transpose(kh, (0, 1, 4, 2, 3)).reshape(b, nk, hr * hr, d))
    plan = _Plan(variant=variant, hr=hr, d=d, n=n, nk=nk, tq=block_q, tq_dkv=block_q, tk=block_k)
    coef = jnp.zeros((plan.ncoef,), jnp.float32)
    if plan.mixes:
        coef = coef.at[: hr * hr].set(params["chh_kernel"].astype(jnp.float32).reshape(hr * hr))
    bias = jnp.pad(hal_bias(params, variant=variant, hr=hr, nk=nk, **static),
                   ((0, 0), (0, plan.nkp - nk)))  # zeros for "copy"
    return _attend(coef, bias, qs, tuple(keys), v, plan, interpret)
