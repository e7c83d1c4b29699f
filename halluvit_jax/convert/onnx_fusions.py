"""Graph passes putting back the native ONNX ops that onnxruntime fuses.

:func:`~halluvit_jax.convert.export.export_onnx` traces the model to a jaxpr before jax2onnx
sees it, so flax's module boundaries are gone and LayerNorm, softmax and GELU arrive as chains
of elementwise ops (with the keepdims broadcasts jax2onnx writes as Reshape/Expand on
Shape/Gather/Concat). onnxruntime's CPU kernels and its transformer fusions
(SkipLayerNormalization, BiasGelu, ...) start from the native ops, so each pass here finds one
chain and replaces it by one node:

* LayerNorm ``d = x - ReduceSum(x)/N; y = d * 1/Sqrt(ReduceSumSquare(d)/N + eps) [* g] [+ b]``
  -> ``LayerNormalization(x, g, b, axis=-1, epsilon=eps)`` (opset 17);
* softmax ``e = Exp(x - ReduceMax(x)); y = e / ReduceSum(e)`` (the max through jax's
  ``Max(-inf, .)`` initial value and the Identity of its stop_gradient) -> ``Softmax(x, axis)``
  (opset 13);
* GELU ``0.5 * x * (1 - Erf(-x/sqrt 2))`` (jax's erfc form), ``0.5 * x * (1 + Erf(x/sqrt 2))``
  or ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``
  -> ``Gelu(x, approximate='none' | 'tanh')`` (opset 20).

A chain is rewritten only when it matches exactly: every constant checked (N against the
static size of the reduced axis, eps a scalar added under the Sqrt, 0.5, 1/sqrt 2, ...), one
reduced axis, the same tensor feeding each branch, no intermediate used outside the chain.
The nodes that only fed the chain (its shape plumbing) go with it; the initializers nobody
reads any more are dropped. Everything else is left as it was.

:func:`fold_transposes` composes a Transpose of a Transpose into one (none when they cancel, as
the two jax2onnx writes after the plain core's CHH product do) and stores a Transpose of an
initializer as the transposed initializer. :func:`fold_constants` evaluates what reads only
constants (the variables are constants in the export) once, at export time,
:func:`pointwise_as_conv` writes a Dense layer over NHWC maps as the 1x1 Conv it is (and
:func:`max_zero_as_relu` jax's relu as ``Relu``), and :func:`fold_channel_affine` folds a
per-channel affine after a Conv or a MatMul (an inference BatchNorm, a bias, a scale) into that
layer's weights. :func:`static_reshapes` writes the Reshape targets jax2onnx computes from the
batch size as constants, :func:`fold_scalar_mul` and :func:`fold_bias_past_matmul` move a
scale and a bias into the neighbouring Dense layer, and :func:`unit_transposes_as_reshapes`
writes a Transpose that moves only unit dims as a Reshape.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Lowest default-domain opset of each native op (LayerNormalization 17, Gelu 20, Softmax 13
#: with the single-axis semantics).
MIN_OPSET = {"LayerNormalization": 17, "Softmax": 13, "Gelu": 20}


@dataclass
class _Match:
    """A chain to replace: the nodes ``nodes`` (indices into the graph's node list), producing
    ``output``, by ``node``; ``initializers`` are new constants the node reads."""

    nodes: set[int]
    node: object
    initializers: list = field(default_factory=list)
    before: list = field(default_factory=list)  # nodes written ahead of ``node``, in order


class _Graph:
    """Producer / consumer / constant / shape lookups over a snapshot of ``graph.node``."""

    def __init__(self, graph):
        from onnx import helper, numpy_helper

        self.graph = graph
        self.nodes = list(graph.node)
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.consumers: dict[str, set[int]] = defaultdict(set)
        for i, n in enumerate(self.nodes):
            for x in n.input:
                self.consumers[x].add(i)
        self.outputs = {o.name for o in graph.output}
        self._tensors = {t.name: t for t in graph.initializer}  # read when asked (weights are big)
        for n in self.nodes:
            value = next((a for a in n.attribute if a.name == "value"), None)
            if n.op_type == "Constant" and value is not None:
                self._tensors[n.output[0]] = helper.get_attribute_value(value)
        self._to_array = numpy_helper.to_array
        self.shapes = _shapes(graph)

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is an initializer or a Constant node's output."""
        t = self._tensors.get(name)
        return None if t is None else self._to_array(t)

    def op(self, name: str, *op_types: str):
        """``(index, node)`` of the producer of ``name`` if its op_type is one of ``op_types``."""
        i = self.producer.get(name)
        if i is None or self.nodes[i].op_type not in op_types:
            return None
        return i, self.nodes[i]

    def scalar(self, name: str) -> float | None:
        t = self._tensors.get(name)
        if t is None or int(np.prod(t.dims)) != 1:
            return None
        return float(self._to_array(t).reshape(()))

    def shape(self, name: str) -> list | None:
        """Dims (int, or the symbol's name) of ``name``, None unless every dim is known."""
        dims = self.shapes.get(name)
        return dims if dims is not None and all(d is not None for d in dims) else None

    def attr(self, node, name: str, default=None):
        from onnx import helper

        a = next((a for a in node.attribute if a.name == name), None)
        return default if a is None else helper.get_attribute_value(a)

    def closure(self, nodes: set[int], keep: Sequence[str], output: str) -> set[int] | None:
        """``nodes`` with the nodes upstream that only feed them (dead once they go), or None
        when a tensor of ``nodes`` other than ``output`` is read outside that set (or by the
        graph's outputs). ``keep``: the tensors the replacement reads."""
        dead = set(nodes)
        todo = [x for i in dead for x in self.nodes[i].input]
        while todo:
            i = self.producer.get(todo.pop())
            if i is None or i in dead:
                continue
            outs = [o for o in self.nodes[i].output if o]
            if any(o in keep or o in self.outputs or not self.consumers[o] <= dead for o in outs):
                continue
            dead.add(i)
            todo.extend(self.nodes[i].input)
        for i in nodes:
            for o in self.nodes[i].output:
                if o and o != output and (o in self.outputs or not self.consumers[o] <= dead):
                    return None
        return dead


def _shapes(graph) -> dict[str, list]:
    """Tensor name -> dims (int, symbol name, or None) from initializers and value_info."""
    shapes: dict[str, list] = {t.name: list(t.dims) for t in graph.initializer}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in v.type.tensor_type.shape.dim]
    return shapes


def _both(node) -> list[tuple[str, str]]:
    """The two operand orders of a commutative binary node."""
    a, b = node.input
    return [(a, b), (b, a)]


def _reduce_axis(g: _Graph, node, rank: int) -> int | None:
    """The one axis (non-negative) a Reduce* node reduces, from its ``axes`` input or
    attribute; None for zero or several axes."""
    axes = g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    axes = g.attr(node, "axes") if axes is None else list(np.ravel(axes))
    if axes is None or len(axes) != 1 or not -rank <= int(axes[0]) < rank:
        return None
    return int(axes[0]) % rank


# --------------------------------------------------------------------------------------------
# Reductions with their kept axis: ReduceX(t, [a], keepdims=1), or keepdims=0 followed by the
# Reshape (or Unsqueeze) that puts back a unit dim at a and an Expand that changes nothing.
# --------------------------------------------------------------------------------------------


def _unit_inserted(g: _Graph, name: str) -> tuple[str, set[int], set[int]] | None:
    """``(inner, axes, nodes)`` when ``name`` is ``inner`` with one unit dim inserted at any of
    ``axes`` (through Identity, a shape-preserving Expand, then a Reshape or Unsqueeze)."""
    nodes: set[int] = set()
    while (hit := g.op(name, "Identity", "Expand")) is not None:
        i, n = hit
        if n.op_type == "Expand" and (g.shape(n.output[0]) is None
                                      or g.shape(n.output[0]) != g.shape(n.input[0])):
            return None
        nodes.add(i)
        name = n.input[0]
    hit = g.op(name, "Reshape", "Unsqueeze")
    if hit is None:
        return None
    i, n = hit
    inner, out = g.shape(n.input[0]), g.shape(n.output[0])
    if inner is None or out is None or len(out) != len(inner) + 1:
        return None
    axes = {a for a in range(len(out)) if out == inner[:a] + [1] + inner[a:]}
    if n.op_type == "Unsqueeze":
        u = g.const(n.input[1]) if len(n.input) > 1 else g.attr(n, "axes")
        axes &= {int(np.ravel(u)[0]) % len(out)} if u is not None and np.size(u) == 1 else set()
    return (n.input[0], axes, nodes | {i}) if axes else None


def _reduction(g: _Graph, name: str, *op_types: str) -> tuple[int, object, int, set[int]] | None:
    """``(index, node, axis, nodes)``: ``name`` is a one-axis reduction ``node`` of one of
    ``op_types`` with the reduced axis kept (``nodes``: the reduction and its unit-dim steps)."""
    hit = g.op(name, *op_types)
    if hit is not None:  # keepdims=1
        i, n = hit
        rank = len(g.shape(n.input[0]) or [])
        axis = _reduce_axis(g, n, rank) if rank and g.attr(n, "keepdims", 1) == 1 else None
        return None if axis is None else (i, n, axis, {i})
    unsq = _unit_inserted(g, name)
    hit = unsq and g.op(unsq[0], *op_types)
    if not hit:
        return None
    i, n = hit
    rank = len(g.shape(n.input[0]) or [])
    axis = _reduce_axis(g, n, rank) if rank and g.attr(n, "keepdims", 1) == 0 else None
    return None if axis is None or axis not in unsq[1] else (i, n, axis, unsq[2] | {i})


def _mean(g: _Graph, name: str, sum_op: str, mean_op: str) -> tuple[str, int, set[int]] | None:
    """``(x, axis, nodes)``: ``name`` is the mean of (``sum_op`` / ``mean_op``) over one axis
    of ``x`` with that axis kept: ``mean_op(x)`` or ``sum_op(x) / N`` (or ``* 1/N``), N the
    static size of the axis."""
    red = _reduction(g, name, mean_op)
    if red is not None:
        return red[1].input[0], red[2], red[3]
    hit = g.op(name, "Div", "Mul")
    if hit is None:
        return None
    i, n = hit
    pairs = [tuple(n.input)] if n.op_type == "Div" else _both(n)
    for s, c in pairs:
        k, red = g.scalar(c), _reduction(g, s, sum_op)
        if k is None or red is None:
            continue
        x, axis = red[1].input[0], red[2]
        size = g.shape(x)[axis]
        count = k if n.op_type == "Div" else (1.0 / k if k else 0.0)
        if isinstance(size, int) and np.float32(count) == np.float32(size):
            return x, axis, red[3] | {i}
    return None


# --------------------------------------------------------------------------------------------
# LayerNorm.
# --------------------------------------------------------------------------------------------


def _inv_sqrt(g: _Graph, node) -> list[tuple[str, str, set[int]]]:
    """``(d, s, nodes)`` for each reading of ``node`` as ``d / s`` (``s`` the Sqrt's output):
    ``Div(d, s)``, ``Mul(d, Div(1, s))`` or ``Mul(d, Reciprocal(s))``."""
    if node.op_type == "Div":
        return [(node.input[0], node.input[1], set())]
    out = []
    for d, r in _both(node) if node.op_type == "Mul" else []:
        hit = g.op(r, "Div", "Reciprocal")
        if hit and hit[1].op_type == "Reciprocal":
            out.append((d, hit[1].input[0], {hit[0]}))
        elif hit and g.scalar(hit[1].input[0]) == 1.0:
            out.append((d, hit[1].input[1], {hit[0]}))
    return out


def _variance(g: _Graph, name: str, d: str) -> tuple[int, set[int]] | None:
    """``(axis, nodes)``: ``name`` is the mean of ``d**2`` over one kept axis."""
    hit = _mean(g, name, "ReduceSumSquare", "")
    if hit is not None:
        return (hit[1], hit[2]) if hit[0] == d else None
    hit = _mean(g, name, "ReduceSum", "ReduceMean")
    if hit is None:
        return None
    sq = g.op(hit[0], "Mul", "Pow")
    if sq is None or (sq[1].op_type == "Mul" and list(sq[1].input) != [d, d]) or (
            sq[1].op_type == "Pow" and (sq[1].input[0] != d or g.scalar(sq[1].input[1]) != 2.0)):
        return None
    return hit[1], hit[2] | {sq[0]}


def _affine(g: _Graph, name: str, op_type: str, size) -> tuple[int, object, np.ndarray] | None:
    """``(index, node, vector)``: the one reader of ``name`` is ``op_type(name, c)`` with a
    constant ``c`` of shape ``[1, ..., 1, size]``."""
    readers = g.consumers[name]
    if len(readers) != 1 or name in g.outputs:
        return None
    (i,) = readers
    n = g.nodes[i]
    if n.op_type != op_type:
        return None
    other = n.input[1] if n.input[0] == name else n.input[0]
    c = g.const(other)
    rank = len(g.shape(name) or [])
    if c is None or c.ndim > rank or c.shape[-1:] != (size,) or c.size != size:
        return None
    return i, n, c.reshape(size)


def _layer_norm(g: _Graph, i: int) -> _Match | None:
    """A LayerNorm over the last axis whose normalization ``d / sqrt(var + eps)`` is node ``i``."""
    from onnx import helper, numpy_helper

    for d, s, nodes in _inv_sqrt(g, g.nodes[i]):
        sqrt = g.op(s, "Sqrt")
        add = sqrt and g.op(sqrt[1].input[0], "Add")
        sub = g.op(d, "Sub")
        if not add or not sub:
            continue
        for var, eps_name in _both(add[1]):
            eps, x = g.scalar(eps_name), sub[1].input[0]
            mean = _mean(g, sub[1].input[1], "ReduceSum", "ReduceMean")
            vhit = _variance(g, var, d)
            shape = g.shape(x)
            if (eps is None or mean is None or vhit is None or mean[0] != x or shape is None
                    or mean[1] != vhit[0] or mean[1] != len(shape) - 1 or eps < 0
                    or g.shape(g.nodes[i].output[0]) != shape):
                continue
            size, y, tail = shape[-1], g.nodes[i].output[0], set()
            scale = bias = None
            if (hit := _affine(g, y, "Mul", size)) is not None:
                tail.add(hit[0])
                y, scale = hit[1].output[0], hit[2]
            if (hit := _affine(g, y, "Add", size)) is not None:
                tail.add(hit[0])
                y, bias = hit[1].output[0], hit[2]
            dtype = np.float32 if scale is None else scale.dtype
            tag = f"{y}_layernorm"
            inits = [numpy_helper.from_array(np.ones(size, dtype) if scale is None else scale,
                                             f"{tag}_scale")]
            if bias is not None:
                inits.append(numpy_helper.from_array(bias, f"{tag}_bias"))
            node = helper.make_node("LayerNormalization", [x] + [t.name for t in inits], [y],
                                    name=tag, axis=-1, epsilon=float(np.float32(eps)))
            matched = {i, sub[0], sqrt[0], add[0]} | nodes | mean[2] | vhit[1] | tail
            return _Match(matched, node, inits)
    return None


# --------------------------------------------------------------------------------------------
# Softmax.
# --------------------------------------------------------------------------------------------


def _row_max(g: _Graph, m: str, y: str, axis: int) -> set[int] | None:
    """The nodes computing ``m``, the max of ``y`` over ``axis`` kept as a unit dim (through
    Identity, ``Max(-inf, .)`` and a Transpose of the reduction matching the one making ``y``)
    or None."""
    skip = lambda name, nodes: _skip_neutral(g, name, nodes)  # noqa: E731
    nodes: set[int] = set()
    m = skip(m, nodes)
    red = _reduction(g, m, "ReduceMax")
    if red is not None and red[2] == axis and red[1].input[0] == y:  # keepdims=1 on y
        return nodes | red[3]
    unsq = _unit_inserted(g, m)
    if unsq is None or axis not in unsq[1]:
        return None
    inner, _, more = unsq
    nodes |= more
    inner = skip(inner, nodes)
    perm = None
    if (hit := g.op(inner, "Transpose")) is not None:
        nodes.add(hit[0])
        perm = list(g.attr(hit[1], "perm") or [])
        inner = skip(hit[1].input[0], nodes)
    hit = g.op(inner, "ReduceMax")
    t = hit and hit[1].input[0]
    rank = len(g.shape(t) or []) if t else 0
    if not hit or not rank or g.attr(hit[1], "keepdims", 1) != 0:
        return None
    a = _reduce_axis(g, hit[1], rank)
    if perm is None:
        return nodes | {hit[0]} if t == y and a == axis else None
    ty = g.op(y, "Transpose")
    p = list(g.attr(ty[1], "perm") or []) if ty and ty[1].input[0] == t else []
    if len(p) != rank or p[axis] != a:
        return None
    kept = [j if j < a else j - 1 for j in p[:axis] + p[axis + 1:]]  # t's dims in the max
    return nodes | {hit[0]} if perm == kept else None


def _skip_neutral(g: _Graph, name: str, nodes: set[int]) -> str:
    """Follows ``name`` up through Identity and ``Max(-inf, .)`` (adding them to ``nodes``)."""
    while (hit := g.op(name, "Identity", "Max")) is not None:
        i, n = hit
        if n.op_type == "Max":
            rest = [b for a, b in _both(n) if g.scalar(a) == -math.inf] if len(n.input) == 2 else []
            if not rest:
                break
            name = rest[0]
        else:
            name = n.input[0]
        nodes.add(i)
    return name


def _softmax(g: _Graph, i: int) -> _Match | None:
    """A softmax ``exp(y - max y) / sum exp(y - max y)`` whose final Div is node ``i``."""
    from onnx import helper

    div = g.nodes[i]
    if div.op_type != "Div":
        return None
    exp = g.op(div.input[0], "Exp")
    total = _reduction(g, div.input[1], "ReduceSum")
    sub = exp and g.op(exp[1].input[0], "Sub")
    if not sub or total is None or total[1].input[0] != div.input[0]:
        return None
    y, axis = sub[1].input[0], total[2]
    rest = _row_max(g, sub[1].input[1], y, axis)
    if rest is None or g.shape(y) is None or g.shape(div.output[0]) != g.shape(y):
        return None
    node = helper.make_node("Softmax", [y], [div.output[0]], name=f"{div.output[0]}_softmax",
                            axis=axis)
    return _Match({i, exp[0], sub[0]} | total[3] | rest, node)


# --------------------------------------------------------------------------------------------
# GELU.
# --------------------------------------------------------------------------------------------


def _factors(g: _Graph, name: str, nodes: set[int], top: bool = True) -> list[str]:
    """The operands of the product tree of Mul nodes computing ``name`` (an inner Mul only
    when nothing else reads it), adding its Mul nodes to ``nodes``."""
    hit = g.op(name, "Mul")
    if hit is None or (not top and (len(g.consumers[name]) != 1 or name in g.outputs)):
        return [name]
    nodes.add(hit[0])
    return [f for x in hit[1].input for f in _factors(g, x, nodes, top=False)]


def _scale_of(g: _Graph, name: str, x: str, nodes: set[int]) -> float | None:
    """``k`` when ``name`` is ``k * x`` through Neg and Mul / Div by scalar constants."""
    k = 1.0
    while name != x:
        hit = g.op(name, "Neg", "Mul", "Div")
        if hit is None:
            return None
        i, n = hit
        if n.op_type == "Neg":
            k, name = -k, n.input[0]
        elif n.op_type == "Div" and (c := g.scalar(n.input[1])):
            k, name = k / c, n.input[0]
        elif n.op_type == "Mul" and (pair := [(a, g.scalar(b)) for a, b in _both(n)
                                              if g.scalar(b) is not None]):
            name, c = pair[0]
            k *= c
        else:
            return None
        nodes.add(i)
    return k


def _close(value: float | None, want: float) -> bool:
    """``value`` is ``want`` to float32 precision (a constant written in float32)."""
    return value is not None and abs(value - want) <= 1e-6 * abs(want)


def _gelu_cdf(g: _Graph, c: str, x: str, nodes: set[int]) -> str | None:
    """The approximation (``'none'`` / ``'tanh'``) when ``c`` is ``1 + erf(x / sqrt 2)`` (also
    as ``1 - erf(-x / sqrt 2)``) or ``1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))``."""
    hit = g.op(c, "Add", "Sub")
    if hit is None:
        return None
    i, n = hit
    sign = 1.0 if n.op_type == "Add" else -1.0
    pairs = _both(n) if n.op_type == "Add" else [tuple(n.input)]
    for one, f in pairs:
        fn = g.op(f, "Erf", "Tanh")
        if g.scalar(one) != 1.0 or fn is None:
            continue
        inner = {i, fn[0]}
        if fn[1].op_type == "Erf":
            k = _scale_of(g, fn[1].input[0], x, inner)
            if _close(k, sign * math.sqrt(0.5)):
                nodes |= inner
                return "none"
        elif sign > 0 and _tanh_argument(g, fn[1].input[0], x, inner):
            nodes |= inner
            return "tanh"
    return None


def _tanh_argument(g: _Graph, name: str, x: str, nodes: set[int]) -> bool:
    """``name`` is ``sqrt(2/pi) * (x + 0.044715 * x^3)``."""
    inner: set[int] = set()
    factors = _factors(g, name, inner)
    consts = [g.scalar(f) for f in factors if g.scalar(f) is not None]
    rest = [f for f in factors if g.scalar(f) is None]
    if len(rest) != 1 or len(consts) != 1 or not _close(consts[0], math.sqrt(2 / math.pi)):
        return False
    add = g.op(rest[0], "Add")
    if add is None:
        return False
    inner.add(add[0])
    for a, cube in _both(add[1]):
        if a != x:
            continue
        more: set[int] = set()
        factors = _factors(g, cube, more)
        k = [g.scalar(f) for f in factors if g.scalar(f) is not None]
        rest = [f for f in factors if g.scalar(f) is None]
        pow3 = len(rest) == 1 and (p := g.op(rest[0], "Pow")) and p[1].input[0] == x and (
            g.scalar(p[1].input[1]) == 3.0)
        if len(k) == 1 and _close(k[0], 0.044715) and (rest == [x] * 3 or pow3):
            nodes |= inner | more | ({p[0]} if pow3 else set())
            return True
    return False


def _gelu(g: _Graph, i: int) -> _Match | None:
    """A GELU ``0.5 * x * cdf(x)`` whose outermost Mul is node ``i``."""
    from onnx import helper

    node = g.nodes[i]
    if node.op_type != "Mul":
        return None
    nodes: set[int] = set()
    factors = _factors(g, node.output[0], nodes)
    halves = [f for f in factors if g.scalar(f) == 0.5]
    rest = [f for f in factors if f not in halves]
    if len(factors) != 3 or len(halves) != 1 or len(rest) != 2:
        return None
    for x, c in (rest, rest[::-1]):
        approximate = _gelu_cdf(g, c, x, nodes)
        if approximate is not None and g.shape(x) is not None and (
                g.shape(node.output[0]) == g.shape(x)):
            out = node.output[0]
            return _Match(nodes, helper.make_node("Gelu", [x], [out], name=f"{out}_gelu",
                                                  approximate=approximate))
    return None


# --------------------------------------------------------------------------------------------
# IHH: the depthwise 3x3 conv with every query row's heads as channels.
# --------------------------------------------------------------------------------------------

#: Channel block of onnxruntime's NCHWc convolutions (16 with AVX-512, 8 with AVX2): a grouped
#: conv whose channel count is a multiple of it runs as one blocked depthwise kernel.
NCHWC_BLOCK = 16


def _ihh_conv(g: _Graph, i: int) -> _Match | None:
    """IHH as jax2onnx writes it: ``Reshape(maps [B, N, H, Hk*Wk] -> [B*N, H, Hk, Wk])``, a
    depthwise ``Conv`` (group H, one kernel per head), an optional per-head bias ``Add`` and the
    ``Reshape`` back to ``[B, N, H, Hk*Wk]`` (node ``i``). onnxruntime runs that conv as
    ``B*N`` images of ``H`` (3) channels, one small im2col GEMM each. The same conv with the
    ``N*H`` (query, head) pairs as channels of ``B`` images -- a free reshape of the same
    memory, the kernels tiled over the queries, the bias in the Conv -- padded with zero
    channels to a multiple of :data:`NCHWC_BLOCK` is one blocked depthwise conv."""
    from onnx import helper, numpy_helper

    out = g.nodes[i]
    if out.op_type != "Reshape":
        return None
    nodes = {i}
    y = out.input[0]
    bias = None
    if (hit := g.op(y, "Add")) is not None:
        for a, b in _both(hit[1]):
            c = g.const(b)
            if g.op(a, "Conv") is not None and c is not None:
                bias, y = c, a
                nodes.add(hit[0])
                break
        else:
            return None
    conv = g.op(y, "Conv")
    if conv is None or len(conv[1].input) != 2:
        return None
    nodes.add(conv[0])
    w = g.const(conv[1].input[1])
    inner = g.op(conv[1].input[0], "Reshape")
    if w is None or inner is None:
        return None
    nodes.add(inner[0])
    x = inner[1].input[0]
    xs, cs, os_ = g.shape(x), g.shape(conv[1].input[0]), g.shape(out.output[0])
    # The batch dim of the result is B (same element count, the other dims equal).
    if xs is None or cs is None or os_ is None or len(xs) != 4 or len(cs) != 4 or os_[1:] != xs[1:]:
        return None
    _, n, h, m = xs
    hk, wk = cs[2], cs[3]
    group = g.attr(conv[1], "group", 1)
    if not all(isinstance(d, int) for d in (n, h, m, hk, wk)) or cs[1] != h or hk * wk != m:
        return None
    if group != h or w.shape[:2] != (h, 1) or w.ndim != 4:
        return None
    if any(v != 1 for v in (g.attr(conv[1], "strides") or [1, 1]) + (g.attr(conv[1], "dilations") or [1, 1])):
        return None
    pads = list(g.attr(conv[1], "pads") or [0, 0, 0, 0])
    kh, kw = w.shape[2:]
    if g.attr(conv[1], "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or (
            pads[0] + pads[2] != kh - 1 or pads[1] + pads[3] != kw - 1):  # output grid = input grid
        return None
    if bias is not None and (bias.size != h or bias.shape[-3:] != (h, 1, 1)):
        return None
    channels = n * h
    padded = -(-channels // NCHWC_BLOCK) * NCHWC_BLOCK
    tag = f"{out.output[0]}_ihh"
    wt = np.zeros((padded, 1, kh, kw), w.dtype)
    wt[:channels] = np.tile(w, (n, 1, 1, 1))  # channel q*H + j: head j's kernel
    bt = np.zeros(padded, w.dtype)
    if bias is not None:
        bt[:channels] = np.tile(bias.reshape(h), n)
    inits = [numpy_helper.from_array(np.array([0, channels, hk, wk], np.int64), f"{tag}_grid"),
             numpy_helper.from_array(wt, f"{tag}_kernel"), numpy_helper.from_array(bt, f"{tag}_bias"),
             numpy_helper.from_array(np.array([0, n, h, m], np.int64), f"{tag}_maps")]
    before = [helper.make_node("Reshape", [x, f"{tag}_grid"], [f"{tag}_in"], name=f"{tag}_in")]
    src = f"{tag}_in"
    if padded != channels:
        inits += [numpy_helper.from_array(np.array([0, 0, 0, 0, 0, padded - channels, 0, 0], np.int64),
                                          f"{tag}_pads"),
                  numpy_helper.from_array(np.array([0], np.int64), f"{tag}_start"),
                  numpy_helper.from_array(np.array([channels], np.int64), f"{tag}_stop"),
                  numpy_helper.from_array(np.array([1], np.int64), f"{tag}_axis")]
        before.append(helper.make_node("Pad", [src, f"{tag}_pads"], [f"{tag}_padded"], name=f"{tag}_pad"))
        src = f"{tag}_padded"
    before.append(helper.make_node("Conv", [src, f"{tag}_kernel", f"{tag}_bias"], [f"{tag}_conv"],
                                   name=f"{tag}_conv", group=padded, kernel_shape=[kh, kw], pads=pads))
    src = f"{tag}_conv"
    if padded != channels:
        before.append(helper.make_node("Slice", [src, f"{tag}_start", f"{tag}_stop", f"{tag}_axis"],
                                       [f"{tag}_sliced"], name=f"{tag}_slice"))
        src = f"{tag}_sliced"
    node = helper.make_node("Reshape", [src, f"{tag}_maps"], [out.output[0]], name=f"{tag}_out")
    return _Match(nodes, node, inits, before)


def ihh_channel_layout(proto) -> int:
    """Rewrites, in place, each IHH depthwise conv over ``[B*N, H, Hk, Wk]`` as one over
    ``[B, N*H (padded), Hk, Wk]`` (:func:`_ihh_conv`); returns how many. Exact: the same
    products and sums per output, the bias added by the Conv."""
    return _apply(proto, _ihh_conv)


# --------------------------------------------------------------------------------------------
# Transposes.
# --------------------------------------------------------------------------------------------


def fold_transposes(proto) -> int:
    """Rewrites, in place, each Transpose of a Transpose as one Transpose of the first's input
    (none when the two cancel) and each Transpose of an initializer nothing else reads as the
    transposed initializer; returns how many Transposes went. (jax2onnx writes the CHH product's
    output through two Transposes that cancel, and its 2-D kernel through a Transpose.)"""
    from onnx import helper, numpy_helper

    graph = proto.graph
    if _has_subgraphs(graph):
        return 0
    g = _Graph(graph)
    readers = {name: len(ids) for name, ids in g.consumers.items()}
    inputs = {i.name for i in graph.input}  # an initializer that is an input can be overridden
    rename: dict[str, str] = {}
    perms: dict[str, tuple[str, list[int]]] = {}  # Transpose output -> (input, perm)
    nodes, inits, before = [], [], sum(n.op_type == "Transpose" for n in g.nodes)
    for node in g.nodes:
        if any(x in rename for x in node.input):
            node = _renamed(node, rename)
        perm = list(g.attr(node, "perm") or [])
        if node.op_type != "Transpose" or not perm:
            nodes.append(node)
            continue
        (x,), (y,) = node.input, node.output
        if x in perms:  # a Transpose of a Transpose: one Transpose of the first's input
            x, first = perms[x]
            perm = [first[j] for j in perm]
            node = helper.make_node("Transpose", [x], [y], name=node.name, perm=perm)
        w = g.const(x) if readers.get(x) == 1 and x not in inputs else None
        if perm == sorted(perm) and y not in g.outputs:
            rename[y] = x
        elif perm == sorted(perm):
            nodes.append(helper.make_node("Identity", [x], [y], name=node.name))
        elif w is not None and y not in g.outputs:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), y))
        else:
            perms[y] = (x, perm)
            nodes.append(node)
    nodes = _live(nodes, {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    _drop_unread(graph, {x for n in g.nodes for x in n.input})
    return before - sum(n.op_type == "Transpose" for n in graph.node)


def _renamed(node, rename: dict[str, str]):
    from onnx import NodeProto

    out = NodeProto()
    out.CopyFrom(node)
    out.input[:] = [rename.get(x, x) for x in node.input]
    return out


def _live(nodes: list, outputs: set[str], ops: Sequence[str] = ("Transpose",)) -> list:
    """``nodes`` without the nodes of types ``ops`` (and what only fed them, among those) whose
    outputs nothing reads."""
    while True:
        read = {x for n in nodes for x in n.input} | outputs
        kept = [n for n in nodes if n.op_type not in ops or any(o in read for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def _has_subgraphs(graph) -> bool:
    """Whether a node carries a graph attribute (If / Loop / Scan bodies read outer tensors)."""
    from onnx import AttributeProto

    kinds = (AttributeProto.GRAPH, AttributeProto.GRAPHS)
    return any(a.type in kinds for n in graph.node for a in n.attribute)


# --------------------------------------------------------------------------------------------
# Constants.
# --------------------------------------------------------------------------------------------

#: Ops never folded even on constant inputs: their outputs are random. (Shape / Size of a
#: runtime tensor are never candidates, their input not being a constant.)
_UNFOLDABLE = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
               "Bernoulli", "Dropout"}
#: A folded tensor may be at most this many times larger than the largest constant it is computed
#: from (an Expand or Pad of a small table to a big one stays in the graph, computed at run time).
FOLD_GROWTH = 4


def fold_constants(proto) -> int:
    """Evaluates, in place, every node whose inputs are all constants (initializers, Constant
    nodes or earlier folded outputs) and stores its outputs as initializers; returns how many
    nodes went. The model's variables are constants in the export, so what is computed from
    them alone (accel's hallucination of an all-zero map, a kernel's per-tap products) is done
    once here rather than in every run or in onnxruntime's session set-up. Exact: the same
    ops, evaluated by ``onnx.reference``. A node whose output would be more than
    ``FOLD_GROWTH`` x its largest input (and over 64 Ki elements) is left in the graph."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    if _has_subgraphs(graph):
        return 0
    g = _Graph(graph)
    inputs = {i.name for i in graph.input}  # an initializer that is an input can be overridden
    known: dict[str, np.ndarray] = {}

    def value(name):
        if name in known:
            return known[name]
        if name in inputs:
            return None
        return g.const(name)

    folded: set[int] = set()
    for i, node in enumerate(g.nodes):
        if node.op_type in _UNFOLDABLE or node.domain not in ("", "ai.onnx"):
            continue
        args = [value(x) if x else None for x in node.input]
        if any(a is None for x, a in zip(node.input, args) if x) or not node.input:
            continue
        try:
            outs = ReferenceEvaluator(node).run(None, {x: a for x, a in zip(node.input, args) if x})
        except Exception:  # an op the reference evaluator lacks: left to the runtime
            continue
        largest = max((a.size for a in args if a is not None), default=1)
        if any(np.size(o) > max(FOLD_GROWTH * largest, 1 << 16) for o in outs):
            continue
        for name, out in zip(node.output, outs):
            if name:
                known[name] = np.asarray(out)
        folded.add(i)
    if not folded:
        return 0
    read = {x for j, n in enumerate(g.nodes) if j not in folded for x in n.input}
    read |= g.outputs
    kept = [n for j, n in enumerate(g.nodes) if j not in folded]
    del graph.node[:]
    graph.node.extend(kept)
    have = {t.name for t in graph.initializer}
    graph.initializer.extend(numpy_helper.from_array(known[name], name)
                             for name in sorted(read & set(known)) if name not in have)
    _drop_unread(graph, {t.name for t in graph.initializer})
    return len(folded)


def _channel_vector(k: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``k`` as a ``[channels]`` vector when broadcasting it against a rank-``rank`` tensor varies
    only along ``axis`` (a scalar is one value for every channel), else None."""
    if k.ndim > rank:
        return None
    full = (1,) * (rank - k.ndim) + k.shape
    if all(d == 1 for d in full):
        return np.full(channels, k.reshape(()), np.float64)
    if full[axis] != channels or any(d != 1 for i, d in enumerate(full) if i != axis):
        return None
    return k.reshape(channels).astype(np.float64)


def fold_channel_affine(proto) -> int:
    """Rewrites, in place, each per-channel affine chain after a Conv or a MatMul by a constant
    ``[in, out]`` weight (``Sub`` / ``Add`` / ``Mul`` / ``Div`` by constants that vary along the
    output channels only, through the NCHW -> NHWC Transpose jax2onnx writes after a Conv) into
    that layer: the Conv's weight and bias, or the MatMul's weight and one ``Add``. The chains
    are the inference BatchNorms after NextViT's convolutions, ``(x - mean) * rsqrt(var + eps)
    * scale + bias`` once :func:`fold_constants` has computed the factors, and a Dense layer's
    bias; timm's torch.onnx graph has them folded the same way. Exact up to float rounding (the
    factors are combined in float64); returns how many chains went."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    if _has_subgraphs(graph):
        return 0
    g = _Graph(graph)
    inputs = {i.name for i in graph.input}
    readers = {name: len(ids) for name, ids in g.consumers.items()}
    taken: set[int] = set()
    replace: dict[int, list] = {}  # node index -> nodes written in its place
    inits, folded = [], 0
    for i, node in enumerate(g.nodes):
        if node.op_type not in ("Conv", "MatMul") or i in taken or len(node.input) < 2:
            continue
        w = g.const(node.input[1]) if node.input[1] not in inputs else None
        if w is None or w.dtype != np.float32 or (node.op_type == "MatMul" and w.ndim != 2):
            continue
        channels = w.shape[0] if node.op_type == "Conv" else w.shape[1]
        out, transpose = node.output[0], None
        if node.op_type == "Conv":
            rank, axis = w.ndim, 1
            j = next(iter(g.consumers.get(out, ())), None) if readers.get(out) == 1 else None
            if j is not None and g.nodes[j].op_type == "Transpose" and out not in g.outputs:
                perm = list(g.attr(g.nodes[j], "perm") or [])
                if sorted(perm) == list(range(rank)):
                    transpose, axis, out = j, perm.index(1), g.nodes[j].output[0]
        else:
            dims = g.shapes.get(out)
            if not dims:
                continue
            rank, axis = len(dims), len(dims) - 1
        a, c, chain = np.ones(channels), np.zeros(channels), []
        while readers.get(out) == 1 and out not in g.outputs:
            j = next(iter(g.consumers[out]))
            nxt = g.nodes[j]
            if nxt.op_type not in ("Sub", "Add", "Mul", "Div") or j in taken or len(nxt.input) != 2:
                break
            other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
            if nxt.input[0] == nxt.input[1] or (nxt.op_type in ("Sub", "Div") and nxt.input[0] != out):
                break
            k = g.const(other) if other not in inputs else None
            k = None if k is None else _channel_vector(k, rank, axis, channels)
            if k is None or (nxt.op_type == "Div" and not np.all(k)):
                break
            if nxt.op_type == "Sub":
                c = c - k
            elif nxt.op_type == "Add":
                c = c + k
            elif nxt.op_type == "Mul":
                a, c = a * k, c * k
            else:
                a, c = a / k, c / k
            chain.append(j)
            out = nxt.output[0]
        if not chain:
            continue
        name = node.output[0]  # unique (node names need not be)
        wn, bn = f"{name}_w_affine", f"{name}_b_affine"
        if node.op_type == "Conv":
            bias = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            bias = np.zeros(channels) if bias is None else bias.astype(np.float64)
            w_new = w.astype(np.float64) * a.reshape((channels,) + (1,) * (w.ndim - 1))
            b_new = bias * a + c
            # The Conv writes the chain's output itself, or the Transpose after it does.
            conv = helper.make_node("Conv", [node.input[0], wn, bn],
                                    [out if transpose is None else name], name=node.name)
            conv.attribute.extend(node.attribute)
            replace[i] = [conv]
            if transpose is not None:
                t = g.nodes[transpose]
                replace[transpose] = [helper.make_node("Transpose", [name], [out], name=t.name,
                                                       perm=list(g.attr(t, "perm")))]
                taken.add(transpose)
        else:
            w_new, b_new = w.astype(np.float64) * a[None, :], c
            mid = f"{name}_affine"
            replace[i] = [helper.make_node("MatMul", [node.input[0], wn], [mid], name=node.name),
                          helper.make_node("Add", [mid, bn], [out], name=f"{name}_bias")]
        inits += [numpy_helper.from_array(w_new.astype(np.float32), wn),
                  numpy_helper.from_array(b_new.astype(np.float32), bn)]
        taken |= {i, *chain}
        for j in chain:
            replace[j] = []
        folded += 1
    if not folded:
        return 0
    _rewrite(graph, [m for i, n in enumerate(g.nodes) for m in replace.get(i, [n])], inits)
    return folded


def _rewrite(graph, nodes: list, inits: Sequence = ()) -> None:
    """``graph`` with the node list ``nodes`` and the initializers ``inits`` added; the
    initializers no node reads any more are dropped."""
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    _drop_unread(graph, {t.name for t in graph.initializer})


def pointwise_as_conv(proto) -> int:
    """Rewrites, in place, each MatMul of a rank-4 ``[B, H, W, Cin]`` tensor by a constant
    ``[Cin, Cout]`` weight (a Dense layer over NHWC channels: NextViT's convolution blocks and
    patch embeddings, PVTv2's FFN around its dwconv, all 1x1 convolutions in timm) as the 1x1
    Conv it is, between the NHWC -> NCHW -> NHWC Transposes jax2onnx writes around every Conv; returns
    how many. Exact (the same products and sums). onnxruntime's CPU provider then runs the
    convolution sections of the network in its blocked NCHWc layout, as it runs timm's graph:
    its transpose optimizer cancels the Transposes between neighbouring convolutions (through
    ``Relu`` and the residual sums), its NCHWc convolution kernels are faster than MatMul at
    these shapes, and the bias, ReLU and residual sum fuse into the Conv. Run it before
    :func:`fold_channel_affine`, which then folds the Dense bias and BatchNorm into the Conv."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    if _has_subgraphs(graph):
        return 0
    g = _Graph(graph)
    inputs = {i.name for i in graph.input}
    nodes, inits, rewritten = [], [], 0
    for node in g.nodes:
        w = (g.const(node.input[1]) if node.op_type == "MatMul" and node.input[1] not in inputs
             else None)
        dims = g.shapes.get(node.input[0]) if w is not None else None
        if w is None or w.ndim != 2 or w.dtype != np.float32 or not dims or len(dims) != 4:
            nodes.append(node)
            continue
        (y,) = node.output
        wn, x_nchw, y_nchw = f"{y}_conv_w", f"{y}_in_nchw", f"{y}_nchw"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T[:, :, None, None]), wn))
        nodes += [helper.make_node("Transpose", [node.input[0]], [x_nchw], perm=[0, 3, 1, 2],
                                   name=x_nchw),  # named after the tensors: node names may be ""
                  helper.make_node("Conv", [x_nchw, wn], [y_nchw], kernel_shape=[1, 1], name=y_nchw),
                  helper.make_node("Transpose", [y_nchw], [y], perm=[0, 2, 3, 1], name=f"{y}_to_nhwc")]
        rewritten += 1
    if rewritten:
        _rewrite(graph, nodes, inits)
    return rewritten


def pad_conv_channels(proto, block: int = NCHWC_BLOCK) -> int:
    """Pads, in place, the channels between two Convs (``A -> B``, both ``group=1``, B the only
    reader of A's output) to a multiple of ``block`` when their count is not one: A gets zero
    filters (weight and bias), B zero input slices, so the padded channels are exactly zero and
    add nothing; returns how many pairs. The cFFN's factors are such a pair on NHWC maps once
    :func:`pointwise_as_conv` has made them 1x1 Convs, and their middle width ``c'`` is rarely a
    multiple of 16 (PVTv2-b1-hal: 38, 76, 190, 303). onnxruntime's blocked NCHWc convolutions
    need their input channels in whole blocks: with 38 it ran ``fc2b`` in plain NCHW behind a
    reorder, then transposed its output back to NHWC; padded, both factors stay blocked and
    onnxruntime's transpose optimizer cancels the layout changes around them, as around the
    baseline's ``fc2``. The padded ``fc2b`` does ``block - c' % block`` more multiply-adds per
    output (zero products); the MAC counts quoted for the model are the JAX model's."""
    from onnx import numpy_helper

    graph = proto.graph
    if _has_subgraphs(graph) or block < 2:
        return 0
    g = _Graph(graph)
    inputs = {i.name for i in graph.input}
    weight = lambda node, k: (g.const(node.input[k])  # noqa: E731
                              if len(node.input) > k and node.input[k] and node.input[k] not in inputs
                              else None)
    inits, replace, taken, stale = [], {}, set(), set()
    for i, a in enumerate(g.nodes):
        mid = a.output[0] if a.op_type == "Conv" else None
        readers = g.consumers.get(mid, set()) if mid else set()
        if mid is None or len(readers) != 1 or mid in g.outputs or i in taken:
            continue
        (j,) = readers
        b = g.nodes[j]
        wa, wb = weight(a, 1), weight(b, 1)
        if (b.op_type != "Conv" or b.input[0] != mid or j in taken or wa is None or wb is None
                or wa.dtype != np.float32 or wb.dtype != np.float32 or wa.ndim != wb.ndim
                or g.attr(a, "group", 1) != 1 or g.attr(b, "group", 1) != 1):
            continue
        c = wa.shape[0]
        pad = -c % block
        bias = weight(a, 2) if len(a.input) > 2 and a.input[2] else np.zeros(c, np.float32)
        if not pad or wb.shape[1] != c or bias is None or bias.shape != (c,):
            continue
        wa = np.concatenate([wa, np.zeros((pad, *wa.shape[1:]), wa.dtype)])
        wb = np.concatenate([wb, np.zeros((wb.shape[0], pad, *wb.shape[2:]), wb.dtype)], axis=1)
        bias = np.concatenate([bias.astype(np.float32), np.zeros(pad, np.float32)])
        names = [f"{mid}_{k}_padded" for k in ("w", "b", "next_w")]
        inits += [numpy_helper.from_array(v, n) for v, n in zip((wa, bias, wb), names)]
        for k, node, args in ((i, a, [a.input[0], names[0], names[1]]),
                              (j, b, [b.input[0], names[2], *b.input[2:]])):
            new = type(node)()
            new.CopyFrom(node)
            del new.input[:]
            new.input.extend(args)
            replace[k] = new
        taken |= {i, j}
        stale.add(mid)
    if not stale:
        return 0
    _rewrite(graph, [replace.get(i, n) for i, n in enumerate(g.nodes)], inits)
    info = [v for v in graph.value_info if v.name not in stale]  # their channel dim changed
    del graph.value_info[:]
    graph.value_info.extend(info)
    return len(stale)


def max_zero_as_relu(proto) -> int:
    """Rewrites, in place, each ``Max(x, 0)`` (how ``jax.nn.relu`` arrives) as ``Relu(x)``, the
    op onnxruntime fuses into the convolution before it; returns how many."""
    from onnx import helper

    graph = proto.graph
    if _has_subgraphs(graph):
        return 0
    g = _Graph(graph)
    inputs = {i.name for i in graph.input}
    nodes, rewritten = [], 0
    for node in g.nodes:
        if node.op_type == "Max" and len(node.input) == 2:
            consts = [g.const(x) if x not in inputs else None for x in node.input]
            zero = [i for i, k in enumerate(consts) if k is not None and k.size == 1 and not k.any()]
            if len(zero) == 1 and consts[zero[0]].dtype == np.float32:
                x, rank = node.input[1 - zero[0]], consts[zero[0]].ndim
                if rank == 0 or len(g.shapes.get(x) or ()) >= rank:  # no broadcast to more dims
                    nodes.append(helper.make_node("Relu", [x], list(node.output), name=node.name))
                    rewritten += 1
                    continue
        nodes.append(node)
    if rewritten:
        _rewrite(graph, nodes)
    return rewritten


def static_reshapes(proto) -> int:
    """Rewrites, in place, every Reshape whose target shape the graph computes at run time (the
    ``Shape -> Gather -> Squeeze -> Unsqueeze -> Concat`` chains jax2onnx writes for a dynamic
    batch) with a constant target: the dims the graph knows as numbers, ``0`` (copy the input's
    dim) where the computed dim is the Reshape's own input dim at the same position, and ``-1``
    for at most one other dim (the batch folded into another axis); returns how many. The
    chains go, and with them the extra readers of the reshaped tensors that kept the other passes
    from folding through them. Exact: onnxruntime computes the same target at run time."""
    from onnx import numpy_helper

    graph = proto.graph
    if _has_subgraphs(graph):
        return 0
    g = _inferred(proto)
    inputs = {i.name for i in graph.input}
    memo: dict[str, np.ndarray | None] = {}

    def value(name: str) -> np.ndarray | None:
        """An object array of the entries of a small int tensor: ints, or ``(tensor, axis)``
        for a runtime dim; None when the graph does not say."""
        if name not in memo:
            memo[name] = None  # cycles and unknown producers
            memo[name] = _shape_value(g, name, inputs, value)
        return memo[name]

    inits, done = [], 0
    for node in g.nodes:
        if (node.op_type != "Reshape" or len(node.input) != 2 or g.attr(node, "allowzero", 0)
                or g.const(node.input[1]) is not None):
            continue
        v = value(node.input[1])
        if v is None or v.ndim != 1:
            continue
        target = [e if isinstance(e, int) else 0 if e == (node.input[0], j) else None
                  for j, e in enumerate(v.tolist())]
        unknown = [j for j, e in enumerate(target) if e is None]
        if len(unknown) > 1 or (unknown and -1 in target):
            continue
        for j in unknown:
            target[j] = -1
        name = f"{node.output[0]}_static_shape"
        inits.append(numpy_helper.from_array(np.array(target, np.int64), name))
        node.input[1] = name
        done += 1
    if done:
        _rewrite(graph, _live(list(graph.node), g.outputs, _SHAPE_ARITHMETIC), inits)
    return done


def _inferred(proto) -> _Graph:
    """A :class:`_Graph` of ``proto`` whose shapes include those onnx infers for the tensors the
    exporter and the earlier passes wrote without one (the batch as its symbol). Inference runs
    on a copy without the weights' values; the graph itself is left as it was."""
    from onnx import GraphProto, shape_inference

    g = _Graph(proto.graph)
    graph = proto.graph
    weightless = type(proto)(  # built from the parts: copying the model would copy the weights
        ir_version=proto.ir_version, opset_import=proto.opset_import,
        graph=GraphProto(name=graph.name, node=graph.node, input=graph.input, output=graph.output,
                         value_info=graph.value_info,
                         initializer=[_shape_only(t) for t in graph.initializer]))
    g.shapes = {**_shapes(shape_inference.infer_shapes(weightless).graph), **g.shapes}
    return g


def unit_transposes_as_reshapes(proto) -> int:
    """Rewrites, in place, each Transpose that moves only unit dims (``[B, N, 1, d] -> [B, 1, N,
    d]``, as jax2onnx writes a one-head attention's operands) as the Reshape it is; returns how
    many. onnxruntime copies the tensor for a Transpose and not for a Reshape. The target: the
    output's dims, ``0`` for a symbolic dim at the same position in the input, ``-1`` for at
    most one other. Exact."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    if _has_subgraphs(graph):
        return 0
    g = _inferred(proto)
    nodes, inits, done = [], [], 0
    for node in g.nodes:
        dims, perm = g.shapes.get(node.input[0]) if node.input else None, g.attr(node, "perm")
        if (node.op_type != "Transpose" or not dims or not perm or None in dims or 0 in dims
                or len(perm) != len(dims)):
            nodes.append(node)
            continue
        out = [dims[j] for j in perm]
        moved = [j for j in perm if dims[j] != 1] != [j for j in range(len(dims)) if dims[j] != 1]
        target = [d if isinstance(d, int) else 0 if dims[j] == d else None for j, d in enumerate(out)]
        if moved or target.count(None) > 1:
            nodes.append(node)
            continue
        name = f"{node.output[0]}_unit_moves"
        inits.append(numpy_helper.from_array(np.array([-1 if d is None else d for d in target],
                                                      np.int64), name))
        nodes.append(helper.make_node("Reshape", [node.input[0], name], list(node.output),
                                      name=node.name))
        done += 1
    if done:
        _rewrite(graph, nodes, inits)
    return done


def _shape_only(t):
    """Initializer ``t`` as onnx's shape inference needs it: its values when small (the shape
    arithmetic reads them), else its dims alone (an empty external-data stub)."""
    from onnx import TensorProto

    if int(np.prod(t.dims)) <= 64:
        return t
    stub = TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
    stub.data_location = TensorProto.EXTERNAL
    stub.external_data.add(key="location", value="unused")
    return stub


#: The ops of jax2onnx's shape arithmetic that `static_reshapes` evaluates.
_SHAPE_ARITHMETIC = ("Shape", "Gather", "Squeeze", "Unsqueeze", "Concat", "Identity")


def _shape_value(g: _Graph, name: str, inputs: set[str], value: Callable) -> np.ndarray | None:
    """`static_reshapes`' evaluation of one tensor of shape arithmetic."""
    k = g.const(name) if name not in inputs else None
    if k is not None:
        return np.array(k.astype(np.int64).tolist(), dtype=object) if k.dtype.kind in "iu" and k.size <= 16 else None
    found = g.op(name, *_SHAPE_ARITHMETIC)
    if found is None:
        return None
    node = found[1]
    if node.op_type == "Shape":
        dims = g.shapes.get(node.input[0])
        if dims is None:
            return None
        out = np.empty(len(dims), dtype=object)
        for j, d in enumerate(dims):
            out[j] = d if isinstance(d, int) else (node.input[0], j)
        return out[g.attr(node, "start", 0):g.attr(node, "end", None)]
    args = [value(x) for x in node.input]
    if any(a is None for a in args):
        return None
    if node.op_type == "Gather":
        if g.attr(node, "axis", 0) != 0 or args[0].ndim != 1:
            return None
        return args[0][np.array(args[1].tolist(), dtype=np.int64)]
    if node.op_type == "Squeeze":
        return args[0].reshape(()) if args[0].size == 1 else None
    if node.op_type == "Unsqueeze":
        shape = list(args[0].shape)
        for axis in sorted(int(a) for a in args[1].reshape(-1).tolist()):
            shape.insert(axis if axis >= 0 else axis + len(shape) + 1, 1)
        return args[0].reshape(shape)
    if node.op_type == "Concat":
        if g.attr(node, "axis") != 0 or any(a.ndim != 1 for a in args):
            return None
        return np.concatenate(args)
    return args[0]  # Identity


#: Ops that only move elements: a scalar factor passes through them unchanged.
_SHAPE_ONLY = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def fold_scalar_mul(proto) -> int:
    """Folds, in place, each ``Mul`` by a scalar constant of a Dense layer's output
    (``MatMul`` by a constant weight, then ``Add`` of a constant bias), reached through ops that
    only move elements (the heads split of attention's ``q * d**-0.5``), into that weight and
    bias; returns how many. Every tensor between must have no other reader (run it after
    `static_reshapes`). Exact up to float rounding (a power-of-two scale: exact)."""
    from onnx import numpy_helper

    graph = proto.graph
    if _has_subgraphs(graph):
        return 0
    g = _Graph(graph)
    inputs = {i.name for i in graph.input}
    only_reader = lambda name: len(g.consumers.get(name, ())) == 1 and name not in g.outputs  # noqa: E731
    rename, dropped, inits, seen = {}, set(), [], set()
    for i, node in enumerate(g.nodes):
        if node.op_type != "Mul" or len(node.input) != 2 or node.output[0] in g.outputs:
            continue
        pair = next(((x, k) for x, k in _both(node) if k not in inputs and g.scalar(k) is not None), None)
        if pair is None:
            continue
        x, k = pair
        while only_reader(x) and g.op(x, *_SHAPE_ONLY) is not None:
            x = g.op(x, *_SHAPE_ONLY)[1].input[0]
        add = g.op(x, "Add") if only_reader(x) else None
        if add is None:
            continue
        mm, bias = next(((g.op(a, "MatMul"), b) for a, b in _both(add[1]) if g.op(a, "MatMul")), (None, None))
        if mm is None or not only_reader(mm[1].output[0]) or mm[0] in seen:
            continue
        w, b = (g.const(n) if n not in inputs else None for n in (mm[1].input[1], bias))
        if w is None or b is None or w.ndim != 2 or b.dtype != np.float32 or b.size != w.shape[1]:
            continue
        scale = np.float64(g.scalar(k))
        wn, bn = f"{mm[1].output[0]}_w_scaled", f"{mm[1].output[0]}_b_scaled"
        inits += [numpy_helper.from_array((w * scale).astype(np.float32), wn),
                  numpy_helper.from_array((b * scale).astype(np.float32), bn)]
        mm[1].input[1] = wn
        add[1].input[list(add[1].input).index(bias)] = bn
        seen.add(mm[0])
        dropped.add(i)
        rename[node.output[0]] = pair[0]
    if not dropped:
        return 0
    nodes = [n for i, n in enumerate(g.nodes) if i not in dropped]
    for n in nodes:
        n.input[:] = [rename.get(x, x) for x in n.input]
    _rewrite(graph, nodes, inits)
    return len(dropped)


def fold_bias_past_matmul(proto) -> int:
    """Rewrites, in place, ``(x @ A + a) @ B + b`` (two Dense layers back to back, cFFN's
    factorized ``W2``) as ``(x @ A) @ B + (a @ B + b)``: one bias ``Add`` fewer; returns how
    many. The intermediate must have no other reader. Exact up to float rounding (``a @ B`` is
    computed in float64)."""
    from onnx import numpy_helper

    graph = proto.graph
    if _has_subgraphs(graph):
        return 0
    g = _Graph(graph)
    inputs = {i.name for i in graph.input}
    const = lambda name: g.const(name) if name not in inputs else None  # noqa: E731
    only = lambda name: (next(iter(g.consumers[name])) if len(g.consumers.get(name, ())) == 1  # noqa: E731
                         and name not in g.outputs else None)
    dropped, inits = set(), []
    for i, node in enumerate(g.nodes):
        if node.op_type != "MatMul" or i in dropped:
            continue
        a_const = const(node.input[1])
        j = only(node.output[0])
        if a_const is None or a_const.ndim != 2 or j is None or g.nodes[j].op_type != "Add":
            continue
        first_add = g.nodes[j]
        a_name = next((b for x, b in _both(first_add) if x == node.output[0]), None)
        a = const(a_name) if a_name else None
        k = only(first_add.output[0])
        if a is None or a.shape != (a_const.shape[1],) or k is None:
            continue
        second = g.nodes[k]
        big_b = const(second.input[1]) if second.op_type == "MatMul" else None
        if big_b is None or big_b.ndim != 2 or second.input[0] != first_add.output[0]:
            continue
        m = only(second.output[0])
        last_add = g.nodes[m] if m is not None and g.nodes[m].op_type == "Add" else None
        b_name = next((b for x, b in _both(last_add) if x == second.output[0]), None) if last_add else None
        b = const(b_name) if b_name else None
        if b is None or b.shape != (big_b.shape[1],) or m in dropped or j in dropped:
            continue
        name = f"{second.output[0]}_b_past"
        folded = a.astype(np.float64) @ big_b.astype(np.float64) + b
        inits.append(numpy_helper.from_array(folded.astype(np.float32), name))
        last_add.input[list(last_add.input).index(b_name)] = name
        second.input[0] = node.output[0]
        dropped.add(j)
    if not dropped:
        return 0
    _rewrite(graph, [n for i, n in enumerate(g.nodes) if i not in dropped], inits)
    return len(dropped)


# --------------------------------------------------------------------------------------------
# Applying the passes.
# --------------------------------------------------------------------------------------------

PASSES: dict[str, Callable[[_Graph, int], _Match | None]] = {
    "LayerNormalization": _layer_norm, "Softmax": _softmax, "Gelu": _gelu}


def _opset(proto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _apply(proto, find: Callable[[_Graph, int], _Match | None]) -> int:
    """Replaces every chain ``find`` matches (non-overlapping); returns how many."""
    graph = proto.graph
    if _has_subgraphs(graph):
        return 0
    g = _Graph(graph)
    dead: set[int] = set()
    placed: dict[int, object] = {}  # node index -> replacement written at its place
    inits = []
    for i in range(len(g.nodes)):
        if i in dead:
            continue
        match = find(g, i)
        if match is None:
            continue
        out = match.node.output[0]
        reads = [x for n in (*match.before, match.node) for x in n.input]
        gone = g.closure(match.nodes, reads, out)
        if gone is None or gone & dead:
            continue
        dead |= gone
        placed[g.producer[out]] = [*match.before, match.node]
        inits.extend(match.initializers)
    if not placed:
        return 0
    kept = [m for i, n in enumerate(g.nodes) if i not in dead or i in placed
            for m in placed.get(i, [n])]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(inits)
    _drop_unread(graph, {x for i in dead for x in g.nodes[i].input})
    return len(placed)


def _drop_unread(graph, candidates: set[str]) -> None:
    """Removes the initializers among ``candidates`` and the value_info of tensors no node
    reads or writes any more."""
    used = {x for n in graph.node for x in (*n.input, *n.output)} | {o.name for o in graph.output}
    inits = [t for t in graph.initializer if t.name in used or t.name not in candidates]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
    info = [v for v in graph.value_info if v.name in used]
    if len(info) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(info)


def fuse_native_ops(proto, ops: Sequence[str] = tuple(PASSES)) -> dict[str, int]:
    """Rewrites, in place, the LayerNorm / softmax / GELU chains of ``proto`` (an
    ``onnx.ModelProto``) into ``ops``' native nodes where its opset has them; returns how many
    of each it wrote."""
    unknown = set(ops) - set(PASSES)
    if unknown:
        raise ValueError(f"Unknown fusion(s) {sorted(unknown)}; choose from {list(PASSES)}.")
    opset = _opset(proto)
    return {op: _apply(proto, PASSES[op]) if opset >= MIN_OPSET[op] else 0 for op in ops}


__all__ = ["FOLD_GROWTH", "MIN_OPSET", "NCHWC_BLOCK", "PASSES", "fold_bias_past_matmul",
           "fold_channel_affine", "fold_constants", "fold_scalar_mul", "fold_transposes",
           "fuse_native_ops", "ihh_channel_layout", "max_zero_as_relu", "pad_conv_channels",
           "pointwise_as_conv", "static_reshapes", "unit_transposes_as_reshapes"]
