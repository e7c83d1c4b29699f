"""Native LayerNormalization / Softmax / Gelu in the ONNX export (issue 24): one node per
LayerNorm, attention softmax and GELU FFN of the reduced DeiT and DeiT-hal, counted from the
model's own module calls, none of their elementwise chains left, and onnxruntime's logits still
JAX's; the exact chains built by hand become the native op with NumPy's values, near misses of
them are left byte for byte as they were."""

from __future__ import annotations

import collections
import math

import jax
import numpy as np
import pytest
from flax import linen as nn
from test_convert_export import FAMILIES, HAVE_ONNX, _deployed

from halluvit_jax.convert import export as ex
from halluvit_jax.layers import Attention, CompactMlp, HalAttention, LayerNorm, Mlp

pytestmark = pytest.mark.skipif(not HAVE_ONNX, reason="needs jax2onnx + onnxruntime")

# What the chains are made of; none of it is left once they are native ops.
CHAIN_OPS = ("ReduceMean", "ReduceSumSquare", "Sqrt", "ReduceMax", "Exp", "Erf", "Tanh")


def _module_counts(model, variables, x) -> collections.Counter:
    """How many LayerNorms, attention layers and GELU FFNs one forward pass calls (traced only)."""
    counts: collections.Counter = collections.Counter()

    def count(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__":
            counts["LayerNormalization"] += isinstance(m, LayerNorm)
            # hMHSA's export (impl='accel') keeps the real and hallucinated softmaxes apart
            counts["Softmax"] += isinstance(m, Attention) + 2 * isinstance(m, HalAttention)
            counts["Gelu"] += isinstance(m, (Mlp, CompactMlp)) and m.act == "gelu"
        return next_fun(*args, **kwargs)

    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    with nn.intercept_methods(count):
        jax.eval_shape(model.apply, variables, x)
    return counts


@pytest.mark.parametrize("name", [pytest.param("deit_tiny", marks=pytest.mark.slow), "deit_tiny_hal"])
def test_deit_export_has_one_native_op_per_layer(name, tmp_path):
    import onnx

    _, overrides, size = FAMILIES["deit"]
    model, variables = _deployed(name, overrides, size)
    path = tmp_path / "model.onnx"
    ex.write_onnx(path, model, variables, size)
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    want = _module_counts(model, variables, np.zeros((1, size, size, 3), np.float32))
    depth = overrides["depth"]
    softmaxes = 2 * depth if name.endswith("_hal") else depth
    assert want == {"LayerNormalization": 2 * depth + 1, "Softmax": softmaxes, "Gelu": depth}
    assert {op: ops[op] for op in want} == want, ops
    assert not any(ops[op] for op in CHAIN_OPS), ops
    # The attention scale folded into q's projection (norms and GELU are native ops), and only
    # the class token's broadcast reads the batch size at run time (static_reshapes).
    assert ops["Mul"] == 0 and ops["Shape"] == 1, ops
    _check_transposes(onnx.load(path).graph, variables["params"], depth)
    _check_ihh(onnx.load(path).graph, variables["params"], depth)
    # One batch size here; test_convert_export checks batches 1 and 3 of the same export.
    assert ex.check_export("onnx", path, model, variables, size, batches=(2,)) < 1e-5


def _check_ihh(graph, params, depth):
    """Hal models: each block's IHH is one depthwise Conv over the keys (impl='accel' moves the
    hallucination onto them), ``[hr * d, 1, 3, 3]``: the IHH kernel of each hallucinated head
    repeated over that head's d channels; no Add reads a Conv (biases are inside)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    assert not any(made_by.get(x) == "Conv" for n in graph.node if n.op_type == "Add" for x in n.input)
    if "ihh_kernel" not in params["blocks_0"]["attn"]:
        return
    group = lambda n: next((a.i for a in n.attribute if a.name == "group"), 1)  # noqa: E731
    ihh = [n for n in convs if group(n) > 1]
    assert len(ihh) == depth
    for b, n in enumerate(ihh):
        w = numpy_helper.to_array(inits[n.input[1]])
        k = np.asarray(params[f"blocks_{b}"]["attn"]["ihh_kernel"])  # [hr, 3, 3]
        hr = k.shape[0]
        assert w.shape == (group(n), 1, 3, 3) and group(n) % hr == 0
        d = group(n) // hr
        np.testing.assert_allclose(w[:, 0], np.repeat(k, d, axis=0), rtol=1e-6)


def _check_transposes(graph, params, depth):
    """No Transpose reads a Transpose or an initializer, every Softmax reads the logits matmul
    (or the hallucination's bias Add). Hal models: no Softmax reads a Concat
    (real and hallucinated logits stay apart), and each block's CHH is one MatMul of the
    ``[B, hr, N*Nk]`` head maps by its kernel (transposed: ``[g, h]``) on the left."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type == "Transpose":
            assert n.input[0] not in inits and made_by.get(n.input[0]) != "Transpose", n
    # The logits reach the softmax as the matmul writes them: heads leading, no transpose.
    assert all(made_by.get(n.input[0]) in ("MatMul", "Add") for n in graph.node if n.op_type == "Softmax")
    if "chh_kernel" not in params["blocks_0"]["attn"]:
        return
    assert not any(made_by.get(n.input[0]) == "Concat" for n in graph.node if n.op_type == "Softmax")
    mixes = [numpy_helper.to_array(inits[n.input[0]]) for n in graph.node
             if n.op_type == "MatMul" and n.input[0] in inits]
    assert len(mixes) == depth
    for b, w in enumerate(mixes):
        np.testing.assert_allclose(w, np.asarray(params[f"blocks_{b}"]["attn"]["chh_kernel"]).T, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Hand-built chains: [2, 3, 8] float32 input ``x``, output ``y``, opset 23.
# --------------------------------------------------------------------------------------------

SHAPE = (2, 3, 8)
RNG = np.random.default_rng(0)
GAMMA, BETA = RNG.normal(size=8).astype(np.float32), RNG.normal(size=8).astype(np.float32)


def _model(nodes, consts):
    """A model of ``nodes`` (``(op, inputs, output, attrs)``) and scalar / vector
    ``consts`` (int64 for names starting with 'axes'), shapes inferred into value_info."""
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    inits = [numpy_helper.from_array(np.asarray(v, np.int64 if k.startswith("axes") else np.float32), k)
             for k, v in consts.items()]
    graph = helper.make_graph(
        [helper.make_node(op, ins, [out], **attrs) for op, ins, out, attrs in nodes], "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], inits)
    return shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def _layer_norm(eps_under_sqrt=True, mean_axis=-1, var_axis=-1, count=8.0):
    keep = {"keepdims": 1}
    sqrt = ([("Add", ["var", "eps"], "ve", {}), ("Sqrt", ["ve"], "s", {})] if eps_under_sqrt else
            [("Sqrt", ["var"], "r", {}), ("Add", ["r", "eps"], "s", {})])
    nodes = [("ReduceSum", ["x", "axes_m"], "sum", keep), ("Div", ["sum", "n"], "mean", {}),
             ("Sub", ["x", "mean"], "d", {}), ("ReduceSumSquare", ["d", "axes_v"], "ss", keep),
             ("Div", ["ss", "n"], "var", {}), *sqrt, ("Div", ["one", "s"], "inv", {}),
             ("Mul", ["d", "inv"], "nrm", {}), ("Mul", ["nrm", "g"], "sc", {}),
             ("Add", ["sc", "b"], "y", {})]
    return _model(nodes, {"axes_m": [mean_axis], "axes_v": [var_axis], "n": count, "eps": 1e-6,
                          "one": 1.0, "g": GAMMA, "b": BETA})


def _softmax(max_axis=-1, sum_axis=-1):
    keep = {"keepdims": 1}
    return _model([("ReduceMax", ["x", "axes_m"], "m", keep), ("Sub", ["x", "m"], "z", {}),
                   ("Exp", ["z"], "e", {}), ("ReduceSum", ["e", "axes_s"], "t", keep),
                   ("Div", ["e", "t"], "y", {})], {"axes_m": [max_axis], "axes_s": [sum_axis]})


def _gelu(root2=math.sqrt(2.0), half=0.5, plus=True):
    return _model([("Mul", ["x", "half"], "h", {}), ("Div", ["x", "root2"], "u", {}),
                   ("Erf", ["u"], "e", {}), ("Add" if plus else "Sub", ["one", "e"], "c", {}),
                   ("Mul", ["h", "c"], "y", {})], {"half": half, "root2": root2, "one": 1.0})


def _layer_norm_ref(x):
    d = x - x.mean(-1, keepdims=True)
    return d / np.sqrt((d * d).mean(-1, keepdims=True) + 1e-6) * GAMMA + BETA


def _softmax_ref(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _gelu_ref(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


@pytest.mark.parametrize("build,op,ref", [(_layer_norm, "LayerNormalization", _layer_norm_ref),
                                          (_softmax, "Softmax", _softmax_ref),
                                          (_gelu, "Gelu", _gelu_ref)])
def test_exact_chain_becomes_the_native_op(build, op, ref):
    import onnxruntime as ort

    from halluvit_jax.convert.onnx_fusions import fuse_native_ops

    proto = build()
    assert fuse_native_ops(proto)[op] == 1
    assert [n.op_type for n in proto.graph.node] == [op]
    assert {t.name for t in proto.graph.initializer} <= {n for n in proto.graph.node[0].input}
    x = RNG.normal(size=SHAPE).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref(x.astype(np.float64)), rtol=1e-5, atol=1e-5)


NEAR_MISSES = {
    "layer_norm_eps_outside_sqrt": lambda: _layer_norm(eps_under_sqrt=False),
    "layer_norm_over_axis_1": lambda: _layer_norm(mean_axis=1, var_axis=1, count=3.0),
    "layer_norm_mean_and_var_axes_differ": lambda: _layer_norm(var_axis=1),
    "layer_norm_count_not_the_axis_size": lambda: _layer_norm(count=7.0),
    "softmax_max_over_another_axis": lambda: _softmax(max_axis=1),
    "gelu_sqrt2_rounded": lambda: _gelu(root2=1.414),
    "gelu_quarter": lambda: _gelu(half=0.25),
    "gelu_one_minus_erf": lambda: _gelu(plus=False),
}


@pytest.mark.parametrize("build", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_miss_is_left_as_it_was(build):
    from halluvit_jax.convert.onnx_fusions import fuse_native_ops

    proto = build()
    before = proto.SerializeToString()
    assert set(fuse_native_ops(proto).values()) == {0}
    assert proto.SerializeToString() == before


def test_jax_tanh_gelu_and_softmax_on_a_middle_axis_are_fused():
    """The chains jax2onnx writes for ``gelu(approximate=True)`` and ``softmax(axis=1)``."""
    import onnx
    import onnxruntime as ort

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            a = jax.nn.gelu(nn.Dense(8)(x), approximate=True)
            return (a * jax.nn.softmax(a, axis=1)).sum(1)

    model = Tiny()
    variables = model.init(jax.random.key(0), np.zeros((1, 4, 4, 3), np.float32))
    proto = ex.export_onnx(model, variables, 4)
    counts = ex.fuse_native_ops(proto)
    assert counts == {"LayerNormalization": 0, "Softmax": 1, "Gelu": 1}
    nodes = {n.op_type: n for n in proto.graph.node}
    assert onnx.helper.get_attribute_value(nodes["Gelu"].attribute[0]) == b"tanh"
    assert onnx.helper.get_attribute_value(nodes["Softmax"].attribute[0]) == 1
    assert not any(n.op_type in CHAIN_OPS for n in proto.graph.node)
    x = RNG.normal(size=(3, 4, 4, 3)).astype(np.float32)
    got = ex.run_onnx(ort.InferenceSession(proto.SerializeToString()), x)
    want = np.asarray(model.apply(variables, x))
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


def test_fold_transposes_composes_cancels_and_folds_constants():
    """``Transpose(Transpose(x))`` becomes one Transpose, or none when the two cancel; a
    Transpose of an initializer read by it alone becomes the transposed initializer; a
    Transpose with another reader, and the graph's output, stay."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from halluvit_jax.convert.onnx_fusions import fold_transposes

    w = RNG.normal(size=(3, 4)).astype(np.float32)
    def t(x, y, perm):
        return helper.make_node("Transpose", [x], [y], perm=perm)

    nodes = [t("x", "a", [2, 0, 1]), t("a", "b", [1, 2, 0]),  # cancel: b is x
             t("x", "c", [1, 0, 2]), t("c", "d", [0, 2, 1]),  # compose: d = x.transpose(1, 2, 0)
             helper.make_node("Neg", ["c"], ["nc"]),  # c has another reader: stays
             t("w", "wt", [1, 0]), helper.make_node("MatMul", ["b", "wt"], ["m"]),
             t("m", "y", [0, 2, 1])]  # the graph output
    outs = [("y", (2, 3, 3)), ("d", (3, 4, 2)), ("nc", (3, 2, 4))]
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3, 4))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outs],
        [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    x = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    assert fold_transposes(proto) == 3  # a, b and the kernel's
    ops = [(n.op_type, list(n.input)) for n in proto.graph.node]
    assert ops == [("Transpose", ["x"]), ("Transpose", ["x"]), ("Neg", ["c"]),
                   ("MatMul", ["x", "wt"]), ("Transpose", ["m"])], ops
    assert [t.name for t in proto.graph.initializer] == ["wt"]
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    for g, v in zip(got, want):
        np.testing.assert_array_equal(g, v)


# --------------------------------------------------------------------------------------------
# Constants computed once; per-channel affines folded into Conv / MatMul weights.
# --------------------------------------------------------------------------------------------


def _graph(nodes, inits, inputs, outputs):
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def test_fold_constants_computes_what_the_weights_alone_determine():
    """Nodes reading only constants become initializers with their values (here a BatchNorm's
    ``scale / sqrt(var + eps)`` and a table padded and sliced as accel's hallucination bias is);
    a node reading the input, and an Expand of a scalar to a big tensor, stay."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from halluvit_jax.convert.onnx_fusions import fold_constants

    var, scale = RNG.uniform(0.5, 2.0, 8).astype(np.float32), RNG.normal(size=8).astype(np.float32)
    table = RNG.normal(size=(3, 8)).astype(np.float32)
    mk = helper.make_node
    nodes = [mk("Add", ["var", "eps"], ["ve"]), mk("Sqrt", ["ve"], ["s"]), mk("Div", ["scale", "s"], ["k"]),
             mk("Pad", ["table", "pads"], ["tp"]), mk("Slice", ["tp", "starts", "ends", "axes"], ["ts"]),
             mk("ReduceSum", ["ts", "rax"], ["t"], keepdims=0),  # [8]
             mk("Mul", ["x", "k"], ["xk"]), mk("Add", ["xk", "t"], ["xt"]),
             mk("Expand", ["one", "big"], ["ones"]),  # 1 -> [2, 3, 4096, 8]: computed at run time
             mk("ReduceSum", ["ones", "rall"], ["n"], keepdims=0), mk("Mul", ["xt", "n"], ["y"])]
    inits = {"var": var, "eps": np.float32(1e-5), "scale": scale, "table": table,
             "pads": np.array([1, 0, 1, 0], np.int64), "starts": np.array([1], np.int64),
             "ends": np.array([4], np.int64), "axes": np.array([0], np.int64),
             "rax": np.array([0], np.int64), "one": np.float32(1.0),
             "big": np.array([2, 3, 4096, 8], np.int64), "rall": np.array([2], np.int64)}
    proto = _graph(nodes, inits, [("x", SHAPE)], [("y", (2, 3, 8))])
    x = RNG.normal(size=SHAPE).astype(np.float32)
    assert fold_constants(proto) == 6
    assert [n.op_type for n in proto.graph.node] == ["Mul", "Add", "Expand", "ReduceSum", "Mul"]
    got = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_allclose(got["k"], scale / np.sqrt(var.astype(np.float64) + 1e-5), rtol=1e-6)
    np.testing.assert_array_equal(got["t"], table.sum(0))
    assert "var" not in got and "table" not in got  # nobody reads them any more
    y = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    want = (x * scale / np.sqrt(var.astype(np.float64) + 1e-5) + table.sum(0)) * 4096
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def _conv_bn(transpose=True, extra_reader=False, channel_axis_vector=True):
    """Conv (no bias) -> [Transpose NCHW->NHWC] -> (x - mean) * inv * scale + bias, as jax2onnx
    writes an inference BatchNorm once fold_constants has computed ``inv``."""
    from onnx import helper

    c = 4
    w = RNG.normal(size=(c, 3, 3, 3)).astype(np.float32)
    vec = (lambda v: v.reshape(1, 1, 1, c)) if transpose else (lambda v: v.reshape(1, c, 1, 1))
    if not channel_axis_vector:
        vec = lambda v: np.resize(v, (1, 1, 5, c)).astype(np.float32)  # noqa: E731 (varies along W)
    mean, inv, scale, bias = (RNG.normal(size=c).astype(np.float32) for _ in range(4))
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])]
    out = "c"
    if transpose:
        nodes.append(mk("Transpose", ["c"], ["ct"], perm=[0, 2, 3, 1]))
        out = "ct"
    nodes += [mk("Sub", [out, "mean"], ["d"]), mk("Mul", ["d", "inv"], ["n"]),
              mk("Mul", ["scale", "n"], ["s"]), mk("Add", ["s", "bias"], ["y"])]
    outputs = [("y", None)]
    if extra_reader:  # the normalized map is read twice: the chain cannot go
        nodes.append(mk("Neg", ["n"], ["z"]))
        outputs.append(("z", None))
    inits = {"w": w, "mean": vec(mean), "inv": vec(inv), "scale": vec(scale), "bias": vec(bias)}
    return _graph(nodes, inits, [("x", (2, 3, 5, 5))], outputs), (w, mean, inv, scale, bias)


@pytest.mark.parametrize("transpose", [True, False], ids=["nhwc", "nchw"])
def test_fold_channel_affine_puts_a_conv_batchnorm_into_the_conv(transpose):
    import onnxruntime as ort
    from onnx import numpy_helper

    from halluvit_jax.convert.onnx_fusions import fold_channel_affine

    proto, (w, mean, inv, scale, bias) = _conv_bn(transpose)
    x = RNG.normal(size=(2, 3, 5, 5)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    assert fold_channel_affine(proto) == 1
    nodes = list(proto.graph.node)
    assert [n.op_type for n in nodes] == (["Conv", "Transpose"] if transpose else ["Conv"])
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    a = (inv * scale).astype(np.float64)
    np.testing.assert_allclose(inits[nodes[0].input[1]], w * a[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(inits[nodes[0].input[2]], bias - mean * a, rtol=1e-6, atol=1e-7)
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fold_channel_affine_puts_a_dense_bias_and_scale_into_one_add():
    """MatMul by a constant [in, out] weight, its bias Add, a Div by a per-channel constant:
    one MatMul by the scaled weight and one Add."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from halluvit_jax.convert.onnx_fusions import fold_channel_affine

    w, b = RNG.normal(size=(8, 6)).astype(np.float32), RNG.normal(size=6).astype(np.float32)
    k = RNG.uniform(1.0, 2.0, 6).astype(np.float32)
    mk = helper.make_node
    proto = _graph([mk("MatMul", ["x", "w"], ["m"]), mk("Add", ["m", "b"], ["mb"]),
                    mk("Div", ["mb", "k"], ["y"])], {"w": w, "b": b, "k": k}, [("x", SHAPE)], [("y", (2, 3, 6))])
    x = RNG.normal(size=SHAPE).astype(np.float32)
    assert fold_channel_affine(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "Add"]
    y = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, (x.astype(np.float64) @ w + b) / k, rtol=1e-5, atol=1e-5)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert set(inits) == {n.input[1] for n in proto.graph.node}  # the old w, b, k are gone


@pytest.mark.parametrize("kwargs", [{"extra_reader": True}, {"channel_axis_vector": False}],
                         ids=["read_twice", "varies_along_w"])
def test_fold_channel_affine_leaves_what_is_not_a_per_channel_chain(kwargs):
    """A chain whose middle is read elsewhere is cut there (the Sub and the first Mul fold, the
    rest stays); a constant that varies along another axis is not a channel affine at all."""
    import onnxruntime as ort

    from halluvit_jax.convert.onnx_fusions import fold_channel_affine

    proto, _ = _conv_bn(**kwargs)
    x = RNG.normal(size=(2, 3, 5, 5)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    ops = [n.op_type for n in proto.graph.node]
    if "extra_reader" in kwargs:
        assert fold_channel_affine(proto) == 1
        assert [n.op_type for n in proto.graph.node] == ["Conv", "Transpose", "Mul", "Add", "Neg"]
        got = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
        for g, v in zip(got, want):
            np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-5)
    else:
        before = proto.SerializeToString()
        assert fold_channel_affine(proto) == 0
        assert proto.SerializeToString() == before and [n.op_type for n in proto.graph.node] == ops


def test_nhwc_dense_relu_becomes_a_1x1_conv_with_its_bias_and_relu():
    """MatMul of an NHWC map by a constant [in, out] weight, its bias Add and jax's relu
    ``Max(x, 0)``: one 1x1 Conv (weight ``w.T``, the bias folded) between the two layout
    Transposes, and a Relu; the numbers are NumPy's ``max(x @ w + b, 0)``."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from halluvit_jax.convert.onnx_fusions import fold_channel_affine, max_zero_as_relu, pointwise_as_conv

    w, b = RNG.normal(size=(8, 6)).astype(np.float32), RNG.normal(size=6).astype(np.float32)
    mk = helper.make_node
    proto = _graph([mk("MatMul", ["x", "w"], ["m"]), mk("Add", ["m", "b"], ["mb"]),
                    mk("Max", ["zero", "mb"], ["y"])],
                   {"w": w, "b": b, "zero": np.float32(0.0)}, [("x", (2, 4, 5, 8))], [("y", (2, 4, 5, 6))])
    assert pointwise_as_conv(proto) == 1 and max_zero_as_relu(proto) == 1 and fold_channel_affine(proto) == 1
    nodes = list(proto.graph.node)
    assert [n.op_type for n in nodes] == ["Transpose", "Conv", "Transpose", "Relu"]
    assert [list(a.ints) for n in (nodes[0], nodes[2]) for a in n.attribute] == [[0, 3, 1, 2], [0, 2, 3, 1]]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(inits[nodes[1].input[1]], w.T.reshape(6, 8, 1, 1))
    np.testing.assert_allclose(inits[nodes[1].input[2]], b, rtol=1e-7)
    x = RNG.normal(size=(2, 4, 5, 8)).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, np.maximum(x.astype(np.float64) @ w + b, 0.0), rtol=1e-5, atol=1e-5)


def test_what_is_not_an_nhwc_dense_or_a_relu_is_left_as_it_was():
    """A MatMul of tokens (rank 3), one by a runtime weight, a Max with a nonzero constant, and
    a Max whose [1, 1, 1] zero would broadcast a rank-2 input to rank 3: none is rewritten."""
    from onnx import helper

    from halluvit_jax.convert.onnx_fusions import max_zero_as_relu, pointwise_as_conv

    mk = helper.make_node
    w = RNG.normal(size=(8, 8)).astype(np.float32)
    proto = _graph([mk("MatMul", ["t", "w"], ["a"]), mk("MatMul", ["x", "v"], ["c"]),
                    mk("Max", ["a", "half"], ["d"]), mk("Max", ["m", "zeros"], ["e"])],
                   {"w": w, "half": np.float32(0.5), "zeros": np.zeros((1, 1, 1), np.float32)},
                   [("t", (2, 5, 8)), ("x", (2, 4, 5, 8)), ("v", (8, 8)), ("m", (4, 8))],
                   [("c", (2, 4, 5, 8)), ("d", (2, 5, 8)), ("e", (1, 4, 8))])
    before = proto.SerializeToString()
    assert pointwise_as_conv(proto) == 0 and max_zero_as_relu(proto) == 0
    assert proto.SerializeToString() == before


def _conv_pair(c=5, group_b=1, extra_reader=False, bias_a=True):
    """``Conv(x [2, 8, 4, 4] -> c, 1x1) -> Conv(c -> 6, 1x1)`` and their NumPy reference."""
    from onnx import helper

    wa = RNG.normal(size=(c, 8, 1, 1)).astype(np.float32)
    ba = RNG.normal(size=c).astype(np.float32)
    wb = RNG.normal(size=(6, c // group_b, 1, 1)).astype(np.float32)
    bb = RNG.normal(size=6).astype(np.float32)
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "wa", "ba"] if bias_a else ["x", "wa"], ["m"], kernel_shape=[1, 1]),
             mk("Conv", ["m", "wb", "bb"], ["y"], kernel_shape=[1, 1], group=group_b)]
    outputs = [("y", (2, 6, 4, 4))]
    if extra_reader:
        nodes.append(mk("Neg", ["m"], ["z"]))
        outputs.append(("z", (2, c, 4, 4)))
    proto = _graph(nodes, {"wa": wa, "ba": ba, "wb": wb, "bb": bb}, [("x", (2, 8, 4, 4))], outputs)
    x = RNG.normal(size=(2, 8, 4, 4)).astype(np.float32)
    mid = np.einsum("bihw,oi->bohw", x.astype(np.float64), wa[:, :, 0, 0]) + (ba[:, None, None] if bias_a else 0)
    if group_b != 1:  # no reference: only the near-miss test builds it
        return proto, x, None
    return proto, x, np.einsum("bihw,oi->bohw", mid, wb[:, :, 0, 0]) + bb[:, None, None]


@pytest.mark.parametrize("bias_a", [True, False])
def test_pad_conv_channels_pads_the_middle_of_two_convs_to_the_block(bias_a):
    """5 channels between two Convs become 16: the first Conv's extra filters and bias are
    zero, the second's extra input slices too; NumPy's values, and no stale shape of the
    middle tensor left in value_info."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from halluvit_jax.convert.onnx_fusions import NCHWC_BLOCK, pad_conv_channels

    proto, x, want = _conv_pair(bias_a=bias_a)
    assert pad_conv_channels(proto) == 1
    a, b = proto.graph.node
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    wa, ba, wb = inits[a.input[1]], inits[a.input[2]], inits[b.input[1]]
    assert wa.shape == (NCHWC_BLOCK, 8, 1, 1) and ba.shape == (NCHWC_BLOCK,) and wb.shape == (6, NCHWC_BLOCK, 1, 1)
    assert not wa[5:].any() and not ba[5:].any() and not wb[:, 5:].any()
    assert "m" not in {v.name for v in proto.graph.value_info}
    assert {t.name for t in proto.graph.initializer} == {i for n in proto.graph.node for i in n.input[1:]}
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(c=16), dict(c=6, group_b=2), dict(extra_reader=True)],
                         ids=["whole_block", "grouped", "middle_read_twice"])
def test_pad_conv_channels_leaves_what_it_cannot_pad(kwargs):
    from halluvit_jax.convert.onnx_fusions import pad_conv_channels

    proto, _, _ = _conv_pair(**kwargs)
    before = proto.SerializeToString()
    assert pad_conv_channels(proto) == 0
    assert proto.SerializeToString() == before


def test_static_reshapes_writes_the_targets_the_graph_computes_from_the_batch():
    """The dynamic-batch plumbing jax2onnx writes (Shape -> Gather -> Squeeze -> Unsqueeze ->
    Concat) becomes a constant target: ``0`` where the dim is the Reshape's own input dim at the
    same position, ``-1`` for a batch dim read from another tensor; the plumbing goes, and
    onnxruntime gives NumPy's reshape at batch 1 and 3. A target with two runtime dims stays."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from halluvit_jax.convert.onnx_fusions import static_reshapes

    mk = helper.make_node

    def batch_of(src, tag):  # jax2onnx's chain for dim 0 of ``src``, as a [1] tensor
        return [mk("Shape", [src], [f"s{tag}"]), mk("Gather", [f"s{tag}", "i0"], [f"g{tag}"]),
                mk("Squeeze", [f"g{tag}", "ax0"], [f"q{tag}"]), mk("Unsqueeze", [f"q{tag}", "ax0"], [f"u{tag}"])]

    nodes = [*batch_of("x", "x"), mk("Concat", ["ux", "c2", "c12"], ["tx"], axis=0),
             mk("Reshape", ["x", "tx"], ["y"]),  # [B, 4, 6] -> [B, 2, 12]: B copied
             *batch_of("z", "z"), mk("Concat", ["uz", "c24"], ["tz"], axis=0),
             mk("Reshape", ["x", "tz"], ["w"]),  # x's B read from z: -1
             mk("Concat", ["ux", "uz", "c24"], ["tt"], axis=0),
             mk("Reshape", ["v", "tt"], ["t"])]  # two runtime dims: left alone
    consts = {"i0": np.array([0], np.int64), "ax0": np.array([0], np.int64),
              "c2": np.array([2], np.int64), "c12": np.array([12], np.int64), "c24": np.array([24], np.int64)}
    proto = _graph(nodes, consts, [("x", ("B", 4, 6)), ("z", ("B", 5)), ("v", ("B", "B", 24))],
                   [("y", ("B", 2, 12)), ("w", ("B", 24)), ("t", ("B", "B", 24))])
    assert static_reshapes(proto) == 2
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    targets = {n.output[0]: inits.get(n.input[1]) for n in proto.graph.node if n.op_type == "Reshape"}
    np.testing.assert_array_equal(targets["y"], [0, 2, 12])
    np.testing.assert_array_equal(targets["w"], [-1, 24])
    assert targets["t"] is None  # still computed
    reshape_inputs = {x for n in proto.graph.node if n.op_type == "Reshape" for x in n.input}
    assert "tx" not in reshape_inputs and "tz" not in reshape_inputs
    session = ort.InferenceSession(proto.SerializeToString())
    for b in (1, 3):
        x, z = RNG.normal(size=(b, 4, 6)).astype(np.float32), RNG.normal(size=(b, 5)).astype(np.float32)
        v = RNG.normal(size=(b, b, 24)).astype(np.float32)
        y, w, t = session.run(None, {"x": x, "z": z, "v": v})
        np.testing.assert_array_equal(y, x.reshape(b, 2, 12))
        np.testing.assert_array_equal(w, x.reshape(b, 24))
        np.testing.assert_array_equal(t, v)


def test_unit_transposes_become_reshapes_and_others_stay():
    """A Transpose moving only size-1 dims (``[B, N, 1, d] -> [B, 1, N, d]``, a one-head
    attention's operand) becomes a Reshape with target ``[0, 1, N, d]`` (``-1`` for a runtime dim
    that moves); one that moves a real dim and one that moves two runtime dims stay. onnxruntime gives
    NumPy's transposes at batch 1 and 3."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from halluvit_jax.convert.onnx_fusions import unit_transposes_as_reshapes

    mk = helper.make_node
    nodes = [mk("Transpose", ["x"], ["y"], perm=[0, 2, 1, 3]),  # unit dim moved: Reshape
             mk("Transpose", ["x"], ["z"], perm=[0, 3, 2, 1]),  # N and d swap: stays
             mk("Transpose", ["v"], ["t"], perm=[1, 0, 2]),  # two runtime dims swap: stays
             mk("Relu", ["x"], ["r"]), mk("Transpose", ["r"], ["u"], perm=[2, 0, 1, 3])]  # [1, B, N, d]
    proto = _graph(nodes, {}, [("x", ("B", 5, 1, 4)), ("v", ("B", "B", 3))],
                   [("y", ("B", 1, 5, 4)), ("z", ("B", 4, 1, 5)), ("t", ("B", "B", 3)),
                    ("u", (1, "B", 5, 4))])
    assert unit_transposes_as_reshapes(proto) == 2
    ops = {n.output[0]: n.op_type for n in proto.graph.node}
    assert ops == {"y": "Reshape", "z": "Transpose", "t": "Transpose", "r": "Relu", "u": "Reshape"}, ops
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    targets = {n.output[0]: inits[n.input[1]] for n in proto.graph.node if n.op_type == "Reshape"}
    np.testing.assert_array_equal(targets["y"], [0, 1, 5, 4])
    np.testing.assert_array_equal(targets["u"], [1, -1, 5, 4])  # B moved: read as the rest
    session = ort.InferenceSession(proto.SerializeToString())
    for b in (1, 3):
        x, v = RNG.normal(size=(b, 5, 1, 4)).astype(np.float32), RNG.normal(size=(b, b, 3)).astype(np.float32)
        y, z, t, u = session.run(None, {"x": x, "v": v})
        np.testing.assert_array_equal(y, x.transpose(0, 2, 1, 3))
        np.testing.assert_array_equal(z, x.transpose(0, 3, 2, 1))
        np.testing.assert_array_equal(t, v.transpose(1, 0, 2))
        np.testing.assert_array_equal(u, np.maximum(x, 0).transpose(2, 0, 1, 3))


def test_fold_scalar_mul_scales_the_dense_layer_behind_a_heads_reshape():
    """``(x @ w + b)`` split into heads, times ``1/sqrt(d)``: the Mul goes, the weight and bias
    are scaled, and the values are NumPy's. Where the Dense output has a second reader or the
    factor is not a scalar, nothing changes."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from halluvit_jax.convert.onnx_fusions import fold_scalar_mul

    w, b = RNG.normal(size=(8, 6)).astype(np.float32), RNG.normal(size=6).astype(np.float32)
    mk = helper.make_node
    consts = {"w": w, "b": b, "heads": np.array([0, 5, 2, 3], np.int64),
              "s": np.float32(1 / math.sqrt(3)), "per": np.arange(3, dtype=np.float32)}
    proto = _graph([mk("MatMul", ["x", "w"], ["m"]), mk("Add", ["m", "b"], ["mb"]),
                    mk("Reshape", ["mb", "heads"], ["r"]), mk("Mul", ["r", "s"], ["rs"]), mk("Transpose", ["rs"], ["y"], perm=[0, 2, 1, 3])],
                   consts, [("x", ("B", 5, 8))], [("y", ("B", 2, 5, 3))])
    assert fold_scalar_mul(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "Add", "Reshape", "Transpose"]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_allclose(inits[proto.graph.node[0].input[1]], w / math.sqrt(3), rtol=1e-6)
    x = RNG.normal(size=(2, 5, 8)).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    want = ((x.astype(np.float64) @ w + b) / math.sqrt(3)).reshape(2, 5, 2, 3).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    for nodes, outputs in (
            ([mk("MatMul", ["x", "w"], ["m"]), mk("Add", ["m", "b"], ["mb"]), mk("Reshape", ["mb", "heads"], ["r"]),
              mk("Mul", ["r", "s"], ["rs"]), mk("Neg", ["rs"], ["y"]), mk("Neg", ["mb"], ["n"])],
             [("y", ("B", 5, 2, 3)), ("n", ("B", 5, 6))]),
            ([mk("MatMul", ["x", "w"], ["m"]), mk("Add", ["m", "b"], ["mb"]), mk("Reshape", ["mb", "heads"], ["r"]),
              mk("Mul", ["r", "per"], ["rs"]), mk("Neg", ["rs"], ["y"])], [("y", ("B", 5, 2, 3))])):
        proto = _graph(nodes, consts, [("x", ("B", 5, 8))], outputs)
        before = proto.SerializeToString()
        assert fold_scalar_mul(proto) == 0 and proto.SerializeToString() == before


def test_fold_bias_past_matmul_moves_the_first_bias_behind_the_second_layer():
    """``(x @ a + p) @ c + q`` (cFFN's factorized W2) becomes ``(x @ a) @ c + (p @ c + q)``:
    one Add fewer and NumPy's values; with the middle read elsewhere nothing changes."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from halluvit_jax.convert.onnx_fusions import fold_bias_past_matmul

    a, p = RNG.normal(size=(8, 5)).astype(np.float32), RNG.normal(size=5).astype(np.float32)
    c, q = RNG.normal(size=(5, 6)).astype(np.float32), RNG.normal(size=6).astype(np.float32)
    mk = helper.make_node
    chain = [mk("MatMul", ["x", "a"], ["m"]), mk("Add", ["m", "p"], ["mp"]),
             mk("MatMul", ["mp", "c"], ["n"]), mk("Add", ["q", "n"], ["y"])]
    consts = {"a": a, "p": p, "c": c, "q": q}
    proto = _graph(chain, consts, [("x", ("B", 4, 8))], [("y", ("B", 4, 6))])
    assert fold_bias_past_matmul(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "MatMul", "Add"]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_allclose(inits[proto.graph.node[2].input[0]], p.astype(np.float64) @ c + q, rtol=1e-6)
    x = RNG.normal(size=(3, 4, 8)).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, (x.astype(np.float64) @ a + p) @ c + q, rtol=1e-5, atol=1e-5)
    proto = _graph([*chain, mk("Neg", ["mp"], ["z"])], consts, [("x", ("B", 4, 8))],
                   [("y", ("B", 4, 6)), ("z", ("B", 4, 5))])
    before = proto.SerializeToString()
    assert fold_bias_past_matmul(proto) == 0 and proto.SerializeToString() == before


# --------------------------------------------------------------------------------------------
# IHH's depthwise conv with the (query, head) pairs as channels.
# --------------------------------------------------------------------------------------------

IHH_X = (2, 5, 3, 16)  # [B, N, heads, Hk*Wk], a 4x4 key grid
IHH_W = RNG.normal(size=(3, 1, 3, 3)).astype(np.float32)
IHH_B = RNG.normal(size=(1, 3, 1, 1)).astype(np.float32)


def _ihh(group=3, strides=(1, 1), bias=IHH_B, back=IHH_X):
    """jax2onnx's IHH: Reshape to [B*N, heads, 4, 4], Conv (group=heads), bias Add, Reshape back."""
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    w = IHH_W if group == 3 else RNG.normal(size=(3, 3 // group, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "grid"], ["g"]),
             helper.make_node("Conv", ["g", "w"], ["c"], group=group, pads=[1, 1, 1, 1], strides=list(strides),
                              kernel_shape=[3, 3]),
             helper.make_node("Add", ["c", "b"], ["cb"]),
             helper.make_node("Reshape", ["cb", "maps"], ["y"])]
    inits = [numpy_helper.from_array(np.array([10, 3, 4, 4], np.int64), "grid"),
             numpy_helper.from_array(np.array(back, np.int64), "maps"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")]
    graph = helper.make_graph(nodes, "ihh", [helper.make_tensor_value_info("x", TensorProto.FLOAT, IHH_X)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def test_ihh_conv_runs_over_query_head_channels_padded_to_the_block():
    import onnxruntime as ort

    from halluvit_jax.convert.onnx_fusions import NCHWC_BLOCK, ihh_channel_layout

    proto = _ihh()
    x = RNG.normal(size=IHH_X).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    assert ihh_channel_layout(proto) == 1
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["Reshape", "Pad", "Conv", "Slice", "Reshape"], ops  # the bias Add is in the Conv
    (conv,) = [n for n in proto.graph.node if n.op_type == "Conv"]
    group = next(a.i for a in conv.attribute if a.name == "group")
    assert group == NCHWC_BLOCK and len(conv.input) == 3  # 5 queries x 3 heads -> 15, padded to 16
    assert {t.name for t in proto.graph.initializer} == {x for n in proto.graph.node for x in n.input[1:]}
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


IHH_MISSES = {
    "not_depthwise": lambda: _ihh(group=1),
    "strided": lambda: _ihh(strides=(2, 2), back=(2, 5, 3, 4)),
    "bias_per_position": lambda: _ihh(bias=RNG.normal(size=(1, 3, 4, 4)).astype(np.float32)),
}


@pytest.mark.parametrize("build", IHH_MISSES.values(), ids=IHH_MISSES.keys())
def test_ihh_near_miss_is_left_as_it_was(build):
    from halluvit_jax.convert.onnx_fusions import ihh_channel_layout

    proto = build()
    before = proto.SerializeToString()
    assert ihh_channel_layout(proto) == 0
    assert proto.SerializeToString() == before


def test_write_optimized_writes_a_checked_graph_next_to_model_onnx(tmp_path):
    """``convert deploy --optimize``: onnxruntime's transformer optimizer on model.onnx, written
    as model.optimized.onnx with its logits checked against model.onnx; no model.onnx, no file."""
    pytest.importorskip("onnxruntime.transformers.optimizer")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from halluvit_jax.convert.state_dict import ConversionError

    with pytest.raises(ConversionError, match="--format onnx"):
        ex.write_optimized(tmp_path)
    nodes = [helper.make_node("Reshape", ["images", "tokens"], ["t"]),
             helper.make_node("MatMul", ["t", "w"], ["h"]), helper.make_node("Add", ["t", "h"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["n"], axis=-1, epsilon=1e-6),
             helper.make_node("ReduceMean", ["n", "axes"], ["logits"], keepdims=0)]
    inits = [numpy_helper.from_array(np.array([0, 16, 3], np.int64), "tokens"),
             numpy_helper.from_array(RNG.normal(size=(3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(GAMMA[:3], "g"), numpy_helper.from_array(BETA[:3], "b"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 4, 4, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / ex.ONNX_NAME)
    info = ex.write_optimized(tmp_path)
    assert info["file"] == ex.OPTIMIZED_ONNX_NAME and (tmp_path / info["file"]).is_file()
    assert info["max_rel_logit_error_vs_onnx"] < 1e-5
