"""The cFFN in training (``fc1 -> act -> fc2a -> fc2b``, each factor ``r`` Dense -> BatchNorm
branches, docs/design.md section 3) as Pallas kernels (TPU/Mosaic; ``interpret=True`` on any
backend), forward and backward: ``impl="pallas"`` runs them in training form and train mode on
tokens and on NHWC maps where they pay (`halluvit_jax.layers.mlp.cffn_pallas`,
`halluvit_jax.layers.mlp._pallas_applies`); elsewhere the accel form runs.

Every BatchNorm is affine per feature once its batch statistics are known, so the compact map is
``out = act(h) @ W_comb + b_comb`` with ``W_comb = Wa_eff @ Wb_eff`` (``[mC, C]``, the Mlp's
``fc2`` shape). The statistics all come from the branch outputs ``y = act(h) @ Wa``
(``Wa``: the ``r`` branches of ``fc2a`` side by side, ``[mC, r c']``): their column sums
``S`` and Gram matrix ``G = y^T y`` give ``fc2a``'s means and variances, and ``fc2b``'s
through ``Cov(z) = Sa^T Cov(y) Sa`` (``z`` = ``fc2a``'s output, ``Sa`` its per-branch scales).

- Forward: a kernel returns ``(S, G)``; ``y`` never reaches HBM. `compact_ffn`'s
  (`fc1_stats_kernel`) also computes ``h = x @ W1 + b1`` and writes it; `compact_output`'s
  (`stats_kernel`, for PVTv2, whose depthwise conv sits between fc1 and the activation) reads
  ``h``. The small map from ``(S, G)`` and the weights to ``(W_comb, b_comb)`` and the batch
  statistics is plain jax (`combine`); then one XLA matmul writes ``out``.
- Backward: ``dW_comb = act(h)^T dout`` (XLA); the VJP of `combine` gives the cotangents
  ``gS``, ``gG`` of the statistics; a kernel then recomputes ``y`` per block of rows, forms
  ``dh = act'(h) * (dout W_comb^T + dy Wa^T)`` with ``dy = gS + y (gG + gG^T)``, and
  accumulates ``act(h)^T dy``, the statistics' part of ``Wa``'s gradient. `fc1_grad_kernel`
  goes on through fc1 (writes ``dx = dh W1^T``, accumulates fc1's gradients; ``dh`` never
  reaches HBM); `grad_kernel` writes ``dh``.

With fc1 inside, HBM sees ``x`` and ``h`` where an Mlp's XLA program writes and reads ``h``,
``act(h)`` and ``dh``: on tokens the cFFN's train step then moves fewer bytes than the Mlp's
(docs/aot.md). The price is MXU work: the forward's output matmul is ``fc2``-sized (the
factorization's FLOP saving is spent), the backward recomputes ``y`` and both passes form
``y``'s Gram matrix. The statistics are the one-pass ``E[y^2] - E[y]^2`` (as flax's BatchNorm
and `rep_dense_accel`), accumulated in float32.

On tokens (and on PVTv2's maps after its depthwise conv) the kernels read ``h`` (and ``dout``,
and write ``dh``) with the batch next to the features (`_rows_view`: ``[N, B, mC]``,
``[H, W, B, mC]``): XLA:TPU lays activations out that way when the token or map-row count is no
multiple of 8, so the view costs nothing, where a row-major ``[B, ...]`` operand of a Mosaic
call costs relayout copies of ``h`` in HBM. NextViT's NHWC maps, which XLA:TPU lays out
batch-minor for the convolutions around them, take `compact_ffn`'s lanes kernels instead
(`lanes_view`: ``[H, W, C, B]``, the batch on the 128 lanes, the products transposed). The kernels
accumulate over the whole grid (``"arbitrary"`` semantics: one TensorCore); on a mesh of
several devices they run per batch shard and their sums are reduced over the batch axes
(`axes.per_batch_shard`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from halluvit_jax.layers import axes
from halluvit_jax.layers.common import ACTIVATIONS
from halluvit_jax.layers.norm import branch_affine, branch_stats

VMEM_BUDGET = 96 * 2**20  # above this estimate a layer runs the XLA form (`fits`)
_BLOCK_CAP = 2**20  # elements of one block of h


def row_block(rows: int, row_size: int, multiple: int) -> int:
    """Rows per grid step of an axis of ``rows`` rows of ``row_size`` elements each: the
    largest divisor of ``rows`` that is a multiple of ``multiple`` and keeps a block under
    `_BLOCK_CAP` elements, else all rows (a block equal to the array's dimension is always
    allowed, and a divisor leaves no ragged block whose padding would enter the sums)."""
    cap = max(multiple, _BLOCK_CAP // max(row_size, 1))
    if rows <= cap:
        return rows
    return max((d for d in range(multiple, cap + 1, multiple) if rows % d == 0), default=rows)


def _block(shape) -> tuple[int, ...]:
    """The block one grid step reads of the kernels' view of ``h`` (`_rows_view`: ``[N, B, mC]``
    for tokens, ``[H, W, B, mC]`` for maps): batch rows of one token (in multiples of 8), or the
    whole ``[B, mC]`` slabs of a few positions of one map row."""
    if len(shape) == 3:
        return (row_block(shape[1], shape[2], 8), shape[2])
    return (row_block(shape[1], shape[2] * shape[3], 1), shape[2], shape[3])


def _view_shape(shape) -> tuple[int, ...]:
    """The shape of `_rows_view` of an array of ``shape``."""
    return (shape[1], shape[0], shape[2]) if len(shape) == 3 else (shape[1], shape[2], shape[0], shape[3])


def vmem_bytes(block: tuple[int, ...], rc: int, c: int, itemsize: int) -> int:
    """An upper estimate of `grad_kernel`'s VMEM: double-buffered blocks of ``h``, ``dout``,
    ``dh`` and the weights, the float32 accumulators and the kernel's float32 temporaries."""
    hidden, rows = block[-1], math.prod(block[:-1])
    blocks = 2 * itemsize * (2 * rows * hidden + rows * c + hidden * (rc + c)) + 2 * 4 * (rc * rc + rc)
    return blocks + 4 * hidden * rc + 4 * rows * (2 * hidden + 3 * rc + c)


def _fc1_vmem_bytes(block: tuple[int, ...], cin: int, itemsize: int) -> int:
    """What fc1 inside the kernels adds to `vmem_bytes`: ``W1`` double-buffered, its float32
    gradient, the blocks of ``x`` and ``dx``."""
    return (2 * itemsize + 8) * cin * block[-1] + 12 * math.prod(block[:-1]) * cin


def fits(h_shape, rc: int, c: int, itemsize: int, cin: int = 0) -> bool:
    """Whether the kernels' blocks fit `VMEM_BUDGET` for ``h`` of ``h_shape`` (tokens
    ``[B, N, mC]`` or maps ``[B, H, W, mC]``), with fc1 (``cin`` inputs) inside them where
    ``cin`` is given. The budget is a v5e TensorCore's (128 MiB of VMEM)."""
    if len(h_shape) not in (3, 4):
        return False
    block = _block(_view_shape(h_shape))
    return vmem_bytes(block, rc, c, itemsize) + _fc1_vmem_bytes(block, cin, itemsize) <= VMEM_BUDGET


def _gelu_erf(x):
    """timm's GELU through ``erf`` (Mosaic lowers erf, not the erfc of ``jax.nn.gelu``)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / 1.4142135623730951)))


def kernel_activation(act: Callable) -> Callable:
    """``act`` as the kernels compute it: the same function, written with ops Mosaic lowers."""
    return _gelu_erf if act is ACTIVATIONS["gelu"] else act


def _each_slab(ref_shape, body, init):
    """``body(i, carry)`` over the slabs of a block: the block itself for tokens (``i`` None),
    each map position's (``[B, mC]``, or ``[mC, B]`` on the lanes) for maps (a loop where there
    are several)."""
    if len(ref_shape) == 2:
        return body(None, init)
    return body(0, init) if ref_shape[0] == 1 else jax.lax.fori_loop(0, ref_shape[0], body, init)


def _read(ref, i):
    return ref[...] if i is None else ref[i]


def _stats_slab(a, wa_ref, carry):
    """``carry`` plus the column sums and the Gram matrix of ``y = a @ Wa`` of one slab."""
    y = jnp.dot(a, wa_ref[...], preferred_element_type=jnp.float32)
    gram = jax.lax.dot_general(y, y, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return carry[0] + jnp.sum(y, axis=0, keepdims=True), carry[1] + gram


def _first(*refs):
    @pl.when((pl.program_id(0) == 0) & (pl.program_id(1) == 0))
    def _init():
        for ref in refs:
            ref[...] = jnp.zeros_like(ref)


def _write(ref, i, value):
    if i is None:
        ref[...] = value
    else:
        ref[i] = value


def _stats_kernel(h_ref, wa_ref, s_ref, g_ref, *, act):
    _first(s_ref, g_ref)

    def slab(i, carry):
        return _stats_slab(act(_read(h_ref, i).astype(jnp.float32)).astype(wa_ref.dtype), wa_ref, carry)

    s, g = _each_slab(h_ref.shape, slab, (jnp.zeros(s_ref.shape, jnp.float32), jnp.zeros(g_ref.shape, jnp.float32)))
    s_ref[...] += s
    g_ref[...] += g


def _fc1_stats_kernel(x_ref, w1_ref, b1_ref, wa_ref, h_ref, s_ref, g_ref, *, act):
    """`_stats_kernel` with fc1 in front: ``h = x @ W1 + b1`` written once (the backward reads
    it), its activation never."""
    _first(s_ref, g_ref)

    def slab(i, carry):
        h = (jnp.dot(_read(x_ref, i), w1_ref[...], preferred_element_type=jnp.float32)
             + b1_ref[...].astype(jnp.float32)).astype(h_ref.dtype)
        _write(h_ref, i, h)
        return _stats_slab(act(h.astype(jnp.float32)).astype(wa_ref.dtype), wa_ref, carry)

    s, g = _each_slab(h_ref.shape, slab, (jnp.zeros(s_ref.shape, jnp.float32), jnp.zeros(g_ref.shape, jnp.float32)))
    s_ref[...] += s
    g_ref[...] += g


_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b^T


def _mm(a, b, dims=_NN):
    """``a @ b`` (or ``a @ b^T`` with `_NT`), accumulated in float32."""
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _dh_slab(h, dout, wa_ref, wc_ref, gs_ref, gsum_ref, act):
    """``(dh, a, dy)`` of one slab (float32 ``dh``; ``a = act(h)``, ``dy`` in the weights' dtype)."""
    dtype = wa_ref.dtype
    a, act_vjp = jax.vjp(act, h.astype(jnp.float32))
    a = a.astype(dtype)
    y = jnp.dot(a, wa_ref[...], preferred_element_type=jnp.float32)
    dy = (gsum_ref[...] + jnp.dot(y, gs_ref[...], preferred_element_type=jnp.float32)).astype(dtype)
    da = _mm(dout, wc_ref[...], _NT) + _mm(dy, wa_ref[...], _NT)
    return act_vjp(da)[0], a, dy


def _by_cols(a, b):
    """``a^T b`` over the rows of a slab (float32)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _grad_kernel(h_ref, do_ref, wa_ref, wc_ref, gs_ref, gsum_ref, dh_ref, dw_ref, *, act):
    _first(dw_ref)

    def slab(i, dw):
        dh, a, dy = _dh_slab(_read(h_ref, i), _read(do_ref, i), wa_ref, wc_ref, gs_ref, gsum_ref, act)
        _write(dh_ref, i, dh.astype(dh_ref.dtype))
        return dw + _by_cols(a, dy)

    dw_ref[...] += _each_slab(h_ref.shape, slab, jnp.zeros(dw_ref.shape, jnp.float32))


def _fc1_grad_kernel(h_ref, x_ref, do_ref, w1_ref, wa_ref, wc_ref, gs_ref, gsum_ref,
                     dx_ref, dw1_ref, db1_ref, dw_ref, *, act):
    """`_grad_kernel` through fc1 as well: ``dx = dh @ W1^T`` written, ``dh`` never; fc1's
    kernel and bias gradients accumulated."""
    _first(dw1_ref, db1_ref, dw_ref)

    def slab(i, acc):
        x = _read(x_ref, i)
        dh, a, dy = _dh_slab(_read(h_ref, i), _read(do_ref, i), wa_ref, wc_ref, gs_ref, gsum_ref, act)
        dh_low = dh.astype(x.dtype)
        _write(dx_ref, i, _mm(dh_low, w1_ref[...], _NT).astype(dx_ref.dtype))
        return (acc[0] + _by_cols(x, dh_low), acc[1] + jnp.sum(dh, axis=0, keepdims=True), acc[2] + _by_cols(a, dy))

    zeros = tuple(jnp.zeros(r.shape, jnp.float32) for r in (dw1_ref, db1_ref, dw_ref))
    dw1, db1, dw = _each_slab(h_ref.shape, slab, zeros)
    dw1_ref[...] += dw1
    db1_ref[...] += db1
    dw_ref[...] += dw


def _fc1_stats_cost(m: int, cin: int, hidden: int, rc: int, item: int):
    """The `pl.CostEstimate` of an fc1 + statistics kernel over ``m`` rows: its operands once."""
    return pl.CostEstimate(
        flops=2 * m * (cin * hidden + rc * (hidden + rc)), transcendentals=m * hidden,
        bytes_accessed=item * (m * (cin + hidden) + hidden * (cin + rc)) + 4 * rc * (rc + 1))


def _fc1_grad_cost(m: int, cin: int, hidden: int, rc: int, c: int, item: int, wa_layouts: int = 1):
    """The `pl.CostEstimate` of an fc1 gradient kernel over ``m`` rows (``Wa`` read in
    ``wa_layouts`` layouts)."""
    return pl.CostEstimate(
        flops=2 * m * (3 * hidden * rc + rc * rc + hidden * c + 2 * cin * hidden), transcendentals=m * hidden,
        bytes_accessed=item * (m * (hidden + 2 * cin + c) + hidden * (wa_layouts * rc + c + cin))
        + 4 * (rc * rc + rc + hidden * (rc + cin + 1)))


def _params(est: int):
    return pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary"),
                                vmem_limit_bytes=int(min(max(est + est // 2, 32 * 2**20), 120 * 2**20)))


def _row_specs(shape):
    """``(spec(width), grid, block)``: the BlockSpec of operands shaped as ``shape`` up to their
    last axis (``width``), the grid, and the block of ``shape``."""
    block = _block(shape)
    grid = (shape[0], shape[1] // block[0])
    index = (lambda i, j: (i, j, 0)) if len(shape) == 3 else (lambda i, j: (i, j, 0, 0))
    return (lambda w: pl.BlockSpec((None, *block[:-1], w), index)), grid, block


def _whole(shape):
    return pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def stats_kernel(h, wa, *, act: Callable, interpret: bool = False):
    """``(S [1, rc], G [rc, rc])`` (float32) of ``y = act(h) @ wa`` over all rows of ``h``
    (3-D or 4-D, the rows on its leading axes: `_rows_view`'s), without writing ``y``."""
    hidden, rc = h.shape[-1], wa.shape[1]
    by_rows, grid, block = _row_specs(h.shape)
    m = h.size // hidden
    return pl.pallas_call(
        functools.partial(_stats_kernel, act=act), grid=grid,
        in_specs=[by_rows(hidden), _whole((hidden, rc))],
        out_specs=[_whole((1, rc)), _whole((rc, rc))], out_shape=[_f32(1, rc), _f32(rc, rc)],
        compiler_params=_params(vmem_bytes(block, rc, 0, h.dtype.itemsize)), interpret=interpret,
        cost_estimate=pl.CostEstimate(flops=2 * m * rc * (hidden + rc), transcendentals=m * hidden,
                                      bytes_accessed=h.dtype.itemsize * (m * hidden + hidden * rc) + 4 * rc * (rc + 1)),
        name="cffn_stats",
    )(h, wa)


def fc1_stats_kernel(x, w1, b1, wa, *, act: Callable, interpret: bool = False):
    """``(h, S, G)``: `stats_kernel` of ``h = x @ w1 + b1``, which it also writes (``x`` as
    `stats_kernel`'s ``h``, ``[..., C]``)."""
    c, hidden = w1.shape
    rc = wa.shape[1]
    h_shape = (*x.shape[:-1], hidden)
    by_rows, grid, block = _row_specs(h_shape)
    m, item = x.size // c, x.dtype.itemsize
    return pl.pallas_call(
        functools.partial(_fc1_stats_kernel, act=act), grid=grid,
        in_specs=[by_rows(c), _whole((c, hidden)), _whole((1, hidden)), _whole((hidden, rc))],
        out_specs=[by_rows(hidden), _whole((1, rc)), _whole((rc, rc))],
        out_shape=[jax.ShapeDtypeStruct(h_shape, x.dtype), _f32(1, rc), _f32(rc, rc)],
        compiler_params=_params(vmem_bytes(block, rc, 0, item) + _fc1_vmem_bytes(block, c, item)), interpret=interpret,
        cost_estimate=_fc1_stats_cost(m, c, hidden, rc, item), name="cffn_fc1_stats",
    )(x, w1, b1, wa)


def grad_kernel(h, dout, wa, wc, gs, gsum, *, act: Callable, interpret: bool = False):
    """``(dh, act(h)^T dy [mC, rc] float32)`` with ``dy = gsum + (act(h) @ wa) @ gs`` and
    ``dh = act'(h) * (dout @ wc^T + dy @ wa^T)`` (``dh`` shaped as ``h``)."""
    hidden = h.shape[-1]
    rc, c = wa.shape[1], wc.shape[1]
    by_rows, grid, block = _row_specs(h.shape)
    m, item = h.size // hidden, h.dtype.itemsize
    return pl.pallas_call(
        functools.partial(_grad_kernel, act=act), grid=grid,
        in_specs=[by_rows(hidden), by_rows(c), _whole((hidden, rc)), _whole((hidden, c)), _whole((rc, rc)),
                  _whole((1, rc))],
        out_specs=[by_rows(hidden), _whole((hidden, rc))],
        out_shape=[jax.ShapeDtypeStruct(h.shape, h.dtype), _f32(hidden, rc)],
        compiler_params=_params(vmem_bytes(block, rc, c, item)), interpret=interpret,
        cost_estimate=pl.CostEstimate(
            flops=2 * m * (3 * hidden * rc + rc * rc + hidden * c), transcendentals=m * hidden,
            bytes_accessed=item * (2 * m * hidden + m * c + hidden * (rc + c)) + 4 * (rc * rc + rc + hidden * rc)),
        name="cffn_grad",
    )(h, dout, wa, wc, gs, gsum)


def fc1_grad_kernel(h, x, dout, w1, wa, wc, gs, gsum, *, act: Callable, interpret: bool = False):
    """`grad_kernel` continued through fc1: ``(dx, dW1, db1, act(h)^T dy)`` (the last three
    float32 sums), ``dh`` never written."""
    hidden = h.shape[-1]
    cin, rc, c = x.shape[-1], wa.shape[1], wc.shape[1]
    by_rows, grid, block = _row_specs(h.shape)
    m, item = h.size // hidden, h.dtype.itemsize
    return pl.pallas_call(
        functools.partial(_fc1_grad_kernel, act=act), grid=grid,
        in_specs=[by_rows(hidden), by_rows(cin), by_rows(c), _whole((cin, hidden)), _whole((hidden, rc)),
                  _whole((hidden, c)), _whole((rc, rc)), _whole((1, rc))],
        out_specs=[by_rows(cin), _whole((cin, hidden)), _whole((1, hidden)), _whole((hidden, rc))],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), _f32(cin, hidden), _f32(1, hidden), _f32(hidden, rc)],
        compiler_params=_params(vmem_bytes(block, rc, c, item) + _fc1_vmem_bytes(block, cin, item)),
        interpret=interpret,
        cost_estimate=_fc1_grad_cost(m, cin, hidden, rc, c, item), name="cffn_fc1_grad",
    )(h, x, dout, w1, wa, wc, gs, gsum)


def _rows_view(x):
    """``x`` as the kernels read it, and the axis its batch is on: the batch moved next to the
    features (``[N, B, C]``, ``[H, W, B, C]``), the layout XLA:TPU gives activations whose
    token or map-row count is no multiple of 8 (batch rows tile the ``(8, 128)`` registers), so
    that the view is a bitcast, not a relayout."""
    perm = (1, 0, 2) if x.ndim == 3 else (1, 2, 0, 3)
    return x.transpose(perm), x.ndim - 2


def _from_rows_view(x):
    perm = (1, 0, 2) if x.ndim == 3 else (2, 0, 1, 3)
    return x.transpose(perm)


def combine(s, g, rows: int, va, vb, epsilon: float):
    """From the sums ``S`` ``[rc]`` and Gram ``G`` ``[rc, rc]`` of ``y`` over ``rows`` rows:
    ``(W_comb [mC, C], b_comb [C], (mean_a, var_a, mean_b, var_b))`` (float32), the map
    ``act(h) -> out`` with every BatchNorm in batch-statistics form and the statistics each
    BatchNorm updates its running averages with (biased variances, as `rep_dense`)."""
    wa = va["branch_kernel"].astype(jnp.float32)  # [r, mC, c']
    r, _, width = wa.shape
    mean_y = s / rows
    cov_y = g / rows - mean_y[:, None] * mean_y[None, :]
    mean_a = mean_y.reshape(r, width)
    var_a = jnp.maximum(jnp.diagonal(cov_y).reshape(r, width), 0.0)
    s_a, b_a = branch_affine(va["bn"], mean_a, var_a, epsilon)
    stack = (s_a[:, :, None] * jnp.eye(width, dtype=jnp.float32)).reshape(r * width, width)  # z = y @ stack + b_a
    mean_z = mean_y @ stack + b_a
    cov_z = stack.T @ cov_y @ stack
    wb = vb["branch_kernel"].astype(jnp.float32)  # [r, c', C]
    mean_b, var_b = branch_stats(mean_z, cov_z, wb)
    s_b, b_b = branch_affine(vb["bn"], mean_b, var_b, epsilon)
    wb_eff = jnp.einsum("rio,ro->io", wb, s_b)
    wa_eff = jnp.einsum("rhc,rc->hc", wa, s_a)
    return wa_eff @ wb_eff, b_a @ wb_eff + b_b, (mean_a, var_a, mean_b, var_b)


def _side_by_side(va, dtype):
    w = va["branch_kernel"]
    r, hidden, width = w.shape
    return w.transpose(1, 0, 2).reshape(hidden, r * width).astype(dtype)


def _fold(s, g, rows: int, va, vb, epsilon: float, dtype):
    """`combine` of the kernels' sums ``s`` ``[1, rc]`` and ``g``: ``W_comb``, ``b_comb`` (in
    ``dtype``), the batch statistics, and `combine`'s VJP for the backward."""
    (wc, bc, stats), combine_vjp = jax.vjp(lambda s, g, va, vb: combine(s, g, rows, va, vb, epsilon),
                                           s[0], g, va, vb)
    return wc.astype(dtype), bc.astype(dtype), stats, combine_vjp


def _fold_cotangents(act, h, dout, dstats, combine_vjp, feature_axis: int = -1):
    """The VJP of `_fold` given ``out = act(h) @ W_comb + b_comb``'s cotangent ``dout`` (laid out
    as ``h``, the features on ``feature_axis``): ``(gS, gG, dva, dvb)``."""
    lead = tuple(i for i in range(h.ndim) if i != feature_axis % h.ndim)
    dwc = jnp.tensordot(act(h), dout, (lead, lead), preferred_element_type=jnp.float32)
    dbc = jnp.sum(dout, axis=lead, dtype=jnp.float32)
    return combine_vjp((dwc, dbc, dstats))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fc2(h, va, vb, act, epsilon, interpret):
    return _fc2_fwd(h, va, vb, act, epsilon, interpret)[0]


def _fc2_fwd(h, va, vb, act, epsilon, interpret):
    rows = h.size // h.shape[-1]
    wa = _side_by_side(va, h.dtype)
    sums = functools.partial(stats_kernel, act=kernel_activation(act), interpret=interpret)
    hv, bdim = _rows_view(h)
    s, g = axes.per_batch_shard(sums, (bdim, None), (None, None))(hv, wa)
    wc, bc, stats, combine_vjp = _fold(s, g, rows, va, vb, epsilon, h.dtype)
    out = jnp.einsum("...h,hc->...c", act(h), wc) + bc
    return (out, stats), (h, wa, wc, combine_vjp)


def _fc2_bwd(act, epsilon, interpret, res, ct):
    h, wa, wc, combine_vjp = res
    dout, dstats = ct
    dout = dout.astype(h.dtype)
    gs_, gg, dva, dvb = _fold_cotangents(act, h, dout, dstats, combine_vjp)
    grad = functools.partial(grad_kernel, act=kernel_activation(act), interpret=interpret)
    hv, bdim = _rows_view(h)
    dh, dwa = axes.per_batch_shard(grad, (bdim, bdim, None, None, None, None), (bdim, None))(
        hv, _rows_view(dout)[0], wa, wc, gg + gg.T, gs_[None])
    dh = _from_rows_view(dh)
    return dh, _add_branch_grad(dva, dwa), dvb


_fc2.defvjp(_fc2_fwd, _fc2_bwd)


def compact_output(h, va, vb, *, act: Callable, epsilon: float, interpret: bool = False):
    """``(out, (mean_a, var_a, mean_b, var_b))``: ``rep_dense(vb, rep_dense(va, act(h)))`` in
    training form and train mode (the same values, gradients and batch statistics, to float32
    rounding of the one-pass statistics), for ``h`` (fc1's output before the activation, or its
    depthwise conv's) of tokens ``[B, N, mC]`` or maps ``[B, H, W, mC]``."""
    if h.ndim not in (3, 4):
        raise ValueError(f"compact_output takes tokens [B, N, mC] or maps [B, H, W, mC]; got shape {h.shape}.")
    return _fc2(h, va, vb, act, epsilon, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ffn(x, fc1, va, vb, act, epsilon, interpret):
    return _ffn_fwd(x, fc1, va, vb, act, epsilon, interpret)[0]


def _ffn_fwd(x, fc1, va, vb, act, epsilon, interpret):
    lay = _layout(x.ndim)
    w1, b1 = fc1["kernel"].astype(x.dtype), fc1["bias"].astype(x.dtype)[None]
    wa = _side_by_side(va, x.dtype)
    xv, bdim = lay.view(x), lay.batch_axis
    fc1_stats = functools.partial(lay.stats, act=kernel_activation(act), interpret=interpret)
    hv, s, g = axes.per_batch_shard(fc1_stats, (bdim, None, None, None), (bdim, None, None))(xv, w1, b1, wa)
    wc, bc, stats, combine_vjp = _fold(s, g, x.size // x.shape[-1], va, vb, epsilon, x.dtype)
    out = lay.output(act(hv), wc, bc)
    dtypes = (jnp.zeros((0,), fc1["kernel"].dtype), jnp.zeros((0,), fc1["bias"].dtype))  # fc1's dtypes, as arrays
    return (out, stats), (xv, hv, w1, wa, wc, combine_vjp, dtypes)


def _ffn_bwd(act, epsilon, interpret, res, ct):
    xv, hv, w1, wa, wc, combine_vjp, dtypes = res
    dout, dstats = ct
    lay = _layout(hv.ndim)
    dv, bdim = lay.view(dout.astype(hv.dtype)), lay.batch_axis
    gs_, gg, dva, dvb = _fold_cotangents(act, hv, dv, dstats, combine_vjp, lay.feature_axis)
    grad = functools.partial(lay.grad, act=kernel_activation(act), interpret=interpret)
    dxv, dw1, db1, dwa = axes.per_batch_shard(grad, (bdim, bdim, bdim) + (None,) * 5, (bdim, None, None, None))(
        hv, xv, dv, w1, wa, wc, gg + gg.T, gs_[None])
    fc1 = {"kernel": dw1.astype(dtypes[0].dtype), "bias": db1[0].astype(dtypes[1].dtype)}
    return lay.from_view(dxv), fc1, _add_branch_grad(dva, dwa), dvb


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


def _add_branch_grad(dva, dwa):
    """``dva`` plus the statistics' part of fc2a's branch kernels, ``dwa`` ``[mC, r c']``."""
    r, hidden, width = dva["branch_kernel"].shape
    extra = dwa.reshape(hidden, r, width).transpose(1, 0, 2)
    return {**dva, "branch_kernel": dva["branch_kernel"] + extra.astype(dva["branch_kernel"].dtype)}


def compact_ffn(x, fc1, va, vb, *, act: Callable, epsilon: float, interpret: bool = False):
    """`compact_output` with fc1 in the kernels: ``(out, stats)`` of the cFFN
    ``fc2b(fc2a(act(fc1(x))))`` in training form and train mode, for ``x`` tokens ``[B, N, C]``
    (`_rows_view`) or maps ``[B, H, W, C]`` (`lanes_view`, the batch on the lanes); no depthwise
    conv: PVTv2's runs between fc1 and the activation.
    The forward writes ``h = fc1(x)`` (the backward reads it) and not its activation; the
    backward writes ``dx`` and not ``dh``: fc1's own passes over ``h`` and ``dh`` are the ones
    the statistics' extra reads of ``h`` replace."""
    if x.ndim not in (3, 4):
        raise ValueError(f"compact_ffn takes tokens [B, N, C] or maps [B, H, W, C]; got shape {x.shape}.")
    if "bias" not in fc1:
        fc1 = {**fc1, "bias": jnp.zeros(fc1["kernel"].shape[1:], fc1["kernel"].dtype)}
    return _ffn(x, fc1, va, vb, act, epsilon, interpret)


# Maps with the batch on the lanes (NextViT's NHWC maps). XLA:TPU lays the maps around the
# convolutions out batch-minor (``{0,3,2,1}``: ``[H, W, C, B]`` in memory, the batch on the 128
# lanes), so the kernels read that view (`lanes_view`, a bitcast there) in slabs ``[C, B]``, one
# per map position, and compute the transposed products (``h^T = W1^T x^T``, ``y^T = Wa^T a^T``).
# A batch shard narrower than `LANES` pads every slab to the lanes; on fewer rows than
# `MIN_ROWS_PER_HIDDEN` times the hidden width the weights' passes (W_comb, its gradient, the
# f32 sums) outweigh what the kernels save (`halluvit_jax.layers.mlp._pallas_applies`).
LANES = 128
MIN_ROWS_PER_HIDDEN = 4


def lanes_view(x):
    """Maps ``[B, H, W, C]`` as the lanes kernels read them: ``[H, W, C, B]``."""
    return x.transpose(1, 2, 3, 0)


def _from_lanes_view(x):
    return x.transpose(3, 0, 1, 2)


def _lanes_block(view) -> tuple[int, ...]:
    """The block of a ``[H, W, ch, B]`` view one grid step reads: ``(positions, ch, B)``, whole
    ``[ch, B]`` slabs of a few positions of one map row (`row_block`)."""
    return (row_block(view[1], view[2] * view[3], 1), view[2], view[3])


def _lanes_specs(view):
    """``(spec(width), grid, block)`` for operands laid out as the ``[H, W, ch, B]`` ``view``."""
    block = _lanes_block(view)
    return ((lambda w: pl.BlockSpec((None, block[0], w, block[2]), lambda i, j: (i, j, 0, 0))),
            (view[0], view[1] // block[0]), block)


def lanes_vmem_bytes(view, rc: int, c: int, cin: int, itemsize: int) -> int:
    """An upper estimate of the lanes kernels' VMEM for ``h`` viewed as ``view`` ``[H, W, mC, B]``:
    `vmem_bytes` and `_fc1_vmem_bytes` for the same rows, and the second layout of ``Wa``."""
    positions, hidden, batch = _lanes_block(view)
    rows_block = (positions * batch, hidden)
    return (vmem_bytes(rows_block, rc, c, itemsize) + _fc1_vmem_bytes(rows_block, cin, itemsize)
            + 2 * itemsize * hidden * rc)


def fits_lanes(h_shape, rc: int, c: int, cin: int, itemsize: int) -> bool:
    """Whether the lanes kernels' blocks fit `VMEM_BUDGET` for ``h`` ``[B, H, W, mC]`` (one batch
    shard) with fc1 (``cin`` inputs) inside them."""
    b, hh, ww, hidden = h_shape
    return lanes_vmem_bytes((hh, ww, hidden, b), rc, c, cin, itemsize) <= VMEM_BUDGET


def _fc1_stats_lanes_kernel(x_ref, w1t_ref, b1_ref, wat_ref, h_ref, s_ref, g_ref, *, act):
    """`_fc1_stats_kernel` on ``[C, B]`` slabs: ``h^T = W1^T x^T + b1`` written, the column sums
    ``[rc, 1]`` and the Gram matrix of ``y^T = Wa^T act(h)^T`` accumulated."""
    _first(s_ref, g_ref)

    def slab(i, carry):
        h = (_mm(w1t_ref[...], x_ref[i]) + b1_ref[...].astype(jnp.float32)).astype(h_ref.dtype)  # [mC, B]
        h_ref[i] = h
        y = _mm(wat_ref[...], act(h.astype(jnp.float32)).astype(wat_ref.dtype))  # [rc, B]
        return carry[0] + jnp.sum(y, axis=1, keepdims=True), carry[1] + _mm(y, y, _NT)

    s, g = _each_slab(h_ref.shape, slab, (jnp.zeros(s_ref.shape, jnp.float32), jnp.zeros(g_ref.shape, jnp.float32)))
    s_ref[...] += s
    g_ref[...] += g


def _fc1_grad_lanes_kernel(h_ref, x_ref, do_ref, w1_ref, wat_ref, wa_ref, wc_ref, gs_ref, gsum_ref,
                           dx_ref, dw1_ref, db1_ref, dw_ref, *, act):
    """`_fc1_grad_kernel` on ``[C, B]`` slabs (``gs`` symmetric, ``gsum`` ``[rc, 1]``)."""
    _first(dw1_ref, db1_ref, dw_ref)
    dtype = wat_ref.dtype

    def slab(i, acc):
        a, act_vjp = jax.vjp(act, h_ref[i].astype(jnp.float32))
        a = a.astype(dtype)  # [mC, B]
        y = _mm(wat_ref[...], a)  # [rc, B]
        dy = (gsum_ref[...] + _mm(gs_ref[...], y)).astype(dtype)
        dh = act_vjp(_mm(wc_ref[...], do_ref[i]) + _mm(wa_ref[...], dy))[0]  # [mC, B]
        dh_low = dh.astype(dtype)
        dx_ref[i] = _mm(w1_ref[...], dh_low).astype(dx_ref.dtype)  # [C, B]
        return (acc[0] + _mm(x_ref[i], dh_low, _NT), acc[1] + jnp.sum(dh, axis=1, keepdims=True),
                acc[2] + _mm(a, dy, _NT))

    zeros = tuple(jnp.zeros(r.shape, jnp.float32) for r in (dw1_ref, db1_ref, dw_ref))
    dw1, db1, dw = _each_slab(h_ref.shape, slab, zeros)
    dw1_ref[...] += dw1
    db1_ref[...] += db1
    dw_ref[...] += dw


def fc1_stats_lanes(xv, w1, b1, wa, *, act: Callable, interpret: bool = False):
    """`fc1_stats_kernel` for maps in `lanes_view` (``xv`` ``[H, W, C, B]``): ``(h [H, W, mC, B],
    S [1, rc], G [rc, rc])``; ``w1`` ``[C, mC]``, ``b1`` ``[1, mC]``, ``wa`` ``[mC, rc]``."""
    hh, ww, c, b = xv.shape
    hidden, rc = w1.shape[1], wa.shape[1]
    view = (hh, ww, hidden, b)
    spec, grid, _ = _lanes_specs(view)
    m, item = hh * ww * b, xv.dtype.itemsize
    h, s, g = pl.pallas_call(
        functools.partial(_fc1_stats_lanes_kernel, act=act), grid=grid,
        in_specs=[spec(c), _whole((hidden, c)), _whole((hidden, 1)), _whole((rc, hidden))],
        out_specs=[spec(hidden), _whole((rc, 1)), _whole((rc, rc))],
        out_shape=[jax.ShapeDtypeStruct(view, xv.dtype), _f32(rc, 1), _f32(rc, rc)],
        compiler_params=_params(lanes_vmem_bytes(view, rc, 0, c, item)), interpret=interpret,
        cost_estimate=_fc1_stats_cost(m, c, hidden, rc, item), name="cffn_lanes_fc1_stats",
    )(xv, w1.T, b1.reshape(hidden, 1), wa.T)
    return h, s.T, g


def fc1_grad_lanes(hv, xv, dv, w1, wa, wc, gs, gsum, *, act: Callable, interpret: bool = False):
    """`fc1_grad_kernel` for maps in `lanes_view`: ``(dx [H, W, C, B], dW1 [C, mC], db1 [1, mC],
    act(h)^T dy [mC, rc])`` (the last three float32 sums); ``gsum`` ``[1, rc]``."""
    hh, ww, hidden, b = hv.shape
    cin, rc, c = xv.shape[2], wa.shape[1], wc.shape[1]
    spec, grid, _ = _lanes_specs(hv.shape)
    m, item = hh * ww * b, hv.dtype.itemsize
    dx, dw1, db1, dwa = pl.pallas_call(
        functools.partial(_fc1_grad_lanes_kernel, act=act), grid=grid,
        in_specs=[spec(hidden), spec(cin), spec(c), _whole((cin, hidden)), _whole((rc, hidden)),
                  _whole((hidden, rc)), _whole((hidden, c)), _whole((rc, rc)), _whole((rc, 1))],
        out_specs=[spec(cin), _whole((cin, hidden)), _whole((hidden, 1)), _whole((hidden, rc))],
        out_shape=[jax.ShapeDtypeStruct(xv.shape, xv.dtype), _f32(cin, hidden), _f32(hidden, 1), _f32(hidden, rc)],
        compiler_params=_params(lanes_vmem_bytes(hv.shape, rc, c, cin, item)), interpret=interpret,
        cost_estimate=_fc1_grad_cost(m, cin, hidden, rc, c, item, wa_layouts=2), name="cffn_lanes_fc1_grad",
    )(hv, xv, dv, w1, wa.T, wa, wc, gs, gsum.T)
    return dx, dw1, db1.T, dwa


class _Layout(NamedTuple):
    """How `_ffn` lays an input out for its kernels: the view and back, the view's batch and
    feature axes, the two kernels, and ``out`` from ``act(h)`` in the view."""
    view: Callable
    from_view: Callable
    batch_axis: int
    feature_axis: int
    stats: Callable
    grad: Callable
    output: Callable


def _layout(ndim: int) -> _Layout:
    """Tokens: the batch next to the features (`_rows_view`); maps: the batch on the lanes."""
    if ndim == 3:
        return _Layout(lambda x: _rows_view(x)[0], _from_rows_view, 1, -1, fc1_stats_kernel, fc1_grad_kernel,
                       lambda a, wc, bc: _from_rows_view(jnp.einsum("...h,hc->...c", a, wc) + bc))
    return _Layout(lanes_view, _from_lanes_view, 3, 2, fc1_stats_lanes, fc1_grad_lanes,
                   lambda a, wc, bc: jnp.einsum("hwkb,kc->bhwc", a, wc) + bc)
