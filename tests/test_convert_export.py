"""Exports other runtimes run: serialized StableHLO (jax.export) and ONNX (jax2onnx ->
onnxruntime), for reduced DeiT / PVTv2 / NextViT, baseline and folded hal, at two batch sizes;
the StableHLO file deserialized by a process that never imports halluvit_jax; the deploy CLI."""

from __future__ import annotations

import collections

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import halluvit_jax as hv
from halluvit_jax.convert import ConversionError, load_deploy
from halluvit_jax.convert import export as ex
from halluvit_jax.models import deploy_form
from halluvit_jax.reparam import reparameterize

NUM_CLASSES = 7
# family -> (baseline name, overrides of a reduced model, input side)
FAMILIES = {
    "deit": ("deit_tiny", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4), 32),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 0, 0, 1), embed_dims=(16, 32, 40, 64),
                                 mlp_ratios=(8.0, 8.0, 4.0, 4.0)), 64),
    "nextvit": ("nextvit_small", dict(depths=(1, 1, 5, 1), stem_chs=(16, 16, 24),
                                      conv_widths=(32, 48, 48, 96), transformer_widths=(128, 128, 128),
                                      head_dim=16), 64),
}

try:
    import jax2onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    HAVE_ONNX = True
except ImportError:
    HAVE_ONNX = False


def _perturbed(model, size, seed=0):
    """Variables with every weight and statistic away from its init (folding must matter)."""
    v = jax.device_get(model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3))))
    rng = np.random.default_rng(seed)

    def draw(path, a):
        a = np.asarray(a)
        if "var" in jax.tree_util.keystr(path):
            return rng.uniform(0.5, 2.0, a.shape).astype(a.dtype)
        return (a + 0.05 * rng.standard_normal(a.shape)).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(draw, dict(v))


def _deployed(name, overrides, size):
    model = hv.create_model(name, num_classes=NUM_CLASSES, drop_path_rate=0.0, **overrides)
    # The deploy form: cFFN folded, NextViT's pre-BatchNorms merged; other baselines as they are.
    return deploy_form(model), reparameterize(_perturbed(model, size))


# DeiT in the default tier; PVTv2 and NextViT (30-60 s each here, mostly XLA compiles) in -m slow.
CASES = [pytest.param(fam, hal, id=f"{fam}{'_hal' if hal else ''}",
                      marks=pytest.mark.slow)
         for fam in FAMILIES for hal in (False, True)]


@pytest.mark.parametrize("family,hal", CASES)
def test_stablehlo_and_onnx_match_jax(family, hal, tmp_path):
    base, overrides, size = FAMILIES[family]
    model, variables = _deployed(base + ("_hal" if hal else ""), overrides, size)
    formats = ["stablehlo"] + (["onnx"] if HAVE_ONNX else [])
    out = ex.write_formats(formats, tmp_path, model, variables, size)  # checks batches 1 and 3
    for fmt in formats:
        assert out["check"][f"max_rel_logit_error_{fmt}_vs_jax"] < 1e-5, out["check"]
    x = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)
    assert np.abs(ex.reference_logits(model, variables, x)).max() > 1e-3  # errors are relative to it
    assert set(out["export"]["stablehlo"]["platforms"]) == {"cpu", "cuda", "tpu"}
    if HAVE_ONNX and family != "deit":
        _check_pointwise_convs(tmp_path / ex.FILES["onnx"], family, hal, overrides)


def _check_pointwise_convs(path, family, hal, overrides):
    """Every Dense layer over an NHWC map is written as a 1x1 Conv (no MatMul of a rank-4 tensor
    by a weight; the attention products are MatMuls of two activations) and jax's relu as Relu;
    PVTv2's FFN runs on the map: fc1 and fc2 (hal: fc1, fc2a, fc2b) are 1x1 Convs in every
    block."""
    import onnx

    proto = onnx.shape_inference.infer_shapes(onnx.load(path))
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in (*proto.graph.value_info, *proto.graph.input)}
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    weights = {t.name for t in proto.graph.initializer}
    assert not [n.name for n in proto.graph.node
                if n.op_type == "MatMul" and n.input[1] in weights and rank.get(n.input[0]) == 4]
    assert ops["Max"] == 0
    pointwise = sum(n.op_type == "Conv" and [list(a.ints) for a in n.attribute if a.name == "kernel_shape"]
                    == [[1, 1]] for n in proto.graph.node)
    if family == "nextvit":  # ReLU after the MHCA conv and inside each NCB MLP
        assert ops["Relu"] > 0 and pointwise > 0
    else:
        assert pointwise == sum(overrides["depths"]) * (3 if hal else 2)


@pytest.mark.slow  # two reduced NextViT exports, ~40 s here
@pytest.mark.skipif(not HAVE_ONNX, reason="needs jax2onnx + onnxruntime")
def test_nextvit_onnx_has_no_pre_batchnorms(tmp_path):
    """The merged deploy form's ONNX graph has no BatchNorm before q / kv / qkv / fc1, and
    onnxruntime on it gives the unmerged training form's eval logits."""
    import onnx

    base, overrides, size = FAMILIES["nextvit"]
    model = hv.create_model(base, num_classes=NUM_CLASSES, drop_path_rate=0.0, **overrides)
    variables = _perturbed(model, size)
    deploy, deploy_vars = deploy_form(model), reparameterize(variables)

    def batch_norms(v):
        return sum(jax.tree_util.keystr(p).endswith("['var']")
                   for p, _ in jax.tree_util.tree_flatten_with_path(v["batch_stats"])[0])

    def sqrts(proto):  # an eval BatchNorm exports as (x - mean) / Sqrt(var + eps) * scale + bias
        return sum(n.op_type == "Sqrt" for n in proto.graph.node)

    train_sqrts = sqrts(ex.export_onnx(model, variables, size))
    assert train_sqrts == batch_norms(variables)  # nothing else in NextViT takes a Sqrt
    # Merged: 5 NCB norms, 3 NTB norm1 + norm2, 2 sr_norms (stages 1-2; stage 3 has sr 1).
    assert sqrts(ex.export_onnx(deploy, deploy_vars, size)) == batch_norms(deploy_vars) == train_sqrts - 13
    path = tmp_path / "model.onnx"
    ex.write_onnx(path, deploy, deploy_vars, size)
    # The BatchNorms left after the stem, patch-embedding and MHCA convolutions are folded into
    # those layers' weights by write_onnx; only the final norm, which reads a residual sum, keeps
    # its (x - mean) (its rsqrt(var + eps) * scale computed once: no Sqrt at all).
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert ops["Sqrt"] == 0 and ops["Sub"] == 1, ops
    assert ex.check_export("onnx", path, model, variables, size, batches=(1, 3)) < 1e-5


def test_stablehlo_runs_without_this_package(tmp_path):
    base, overrides, size = FAMILIES["deit"]
    model, variables = _deployed(base + "_hal", overrides, size)
    ex.write_stablehlo(tmp_path / "model.jaxexport", model, variables, size)
    x = np.random.default_rng(1).normal(size=(6, size, size, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", ex.reference_logits(model, variables, x))
    script = textwrap.dedent("""
        import sys
        sys.modules["halluvit_jax"] = None   # importing it would fail
        import jax, numpy as np
        exp = jax.export.deserialize(open(sys.argv[1] + "/model.jaxexport", "rb").read())
        x = np.load(sys.argv[1] + "/x.npy")
        for b in (1, 6):
            got = np.asarray(exp.call(x[:b]))
            want = np.load(sys.argv[1] + "/want.npy")[:b]
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err < 1e-5, err
        print("ok", exp.platforms, exp.in_avals[0].shape)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok ('cpu', 'cuda', 'tpu') (batch, 32, 32, 3)" in res.stdout


def test_unknown_format_is_one_error():
    with pytest.raises(ConversionError, match="choose from orbax, stablehlo, onnx"):
        ex.parse_formats(["onnx,tflite"])
    assert ex.parse_formats(["onnx,stablehlo", "onnx"]) == ["onnx", "stablehlo"]
    assert ex.parse_formats(None) == ["orbax"]


@pytest.mark.slow  # ~25 s: exports and checks every format; the fast tier keeps the ONNX export (test_onnx_fusions.py) and StableHLO without this package
def test_deploy_cli_writes_the_formats(tmp_path, capsys):
    from halluvit_jax.convert.__main__ import main as cli_main
    from halluvit_jax.checkpoint.io import save_variables

    base, overrides, size = FAMILIES["deit"]
    name = base + "_hal"
    model = hv.create_model(name, num_classes=NUM_CLASSES, **overrides)
    variables = _perturbed(model, size)  # training form: cFFN branches + statistics
    src = save_variables(tmp_path / "conv", variables,
                         {"model": name, "overrides": {**overrides, "num_classes": NUM_CLASSES}})
    formats = ["stablehlo"] + (["onnx"] if HAVE_ONNX else [])
    out = tmp_path / "export"
    assert cli_main(["deploy", "--checkpoint", src, "--output", str(out),
                     "--format", ",".join(formats)]) == 0
    message = capsys.readouterr().out
    assert "model.jaxexport (max relative logit error vs JAX" in message
    card = json.loads((out / "model_card.json").read_text())
    assert {ex.FILES[f] for f in formats} <= set(os.listdir(out))
    assert card["files"]["stablehlo"] == "model.jaxexport"
    # The exported files compute the *training* model's eval logits (folding included).
    x = np.random.default_rng(2).normal(size=(2, size, size, 3)).astype(np.float32)
    want = np.asarray(jax.jit(model.apply)(variables, x))
    for fmt in formats:
        got = ex.RUNNERS[fmt](out / ex.FILES[fmt], x)
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    # Loading the export with this package still works (the extra files are ignored).
    m, v, c = load_deploy(out)
    np.testing.assert_allclose(np.asarray(jax.jit(m.apply)(v, x)), want, rtol=0,
                               atol=1e-4 * np.abs(want).max())
    # A bad --format: one error line, exit 1, nothing written.
    assert cli_main(["deploy", "--checkpoint", src, "--output", str(tmp_path / "x"),
                     "--format", "tflite"]) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.skipif(not HAVE_ONNX, reason="needs onnx + onnxruntime")
def test_einsum_to_matmul_rewrite_is_exact():
    """Every two-operand Einsum layout the rewrite takes (the exported models' dense and attention
    products among them) gives np.einsum's values; what it cannot express stays an Einsum."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    cases = {"abc,cd->abd": ((2, 3, 4), (4, 5)), "zaybc,zdyc->zyabd": ((2, 3, 4, 5, 6), (2, 7, 4, 6)),
             "zayb,czyda->zybcd": ((2, 3, 4, 5), (6, 2, 4, 7, 3)), "ab,b->a": ((3, 4), (4,)),
             "b,bc->c": ((4,), (4, 5)), "bij,bjk->bik": ((2, 3, 4), (2, 4, 5)),
             "ij,kj->ik": ((3, 4), (5, 4)), "aij,jk->kai": ((2, 3, 4), (4, 5)),
             "xabc,xcde->xaebd": ((2, 3, 4, 5), (2, 5, 6, 7)), "abc,abd->cd": ((2, 3, 4), (2, 3, 5))}
    # DeiT attention as jax2onnx writes it: [B, N, heads, 1, hd] queries (a unit group dim).
    unit = {"zaybc,zdyc->zyabd": ((2, 7, 3, 1, 5), (2, 6, 3, 5)),
            "zayb,czyda->zybcd": ((2, 4, 3, 7), (1, 2, 3, 6, 4))}
    for eq, (sa, sb) in [*cases.items(), *unit.items()]:
        a, b = rng.standard_normal(sa).astype(np.float32), rng.standard_normal(sb).astype(np.float32)
        want = np.einsum(eq, a, b)
        graph = helper.make_graph(
            [helper.make_node("Einsum", ["A", "B"], ["Y"], equation=eq)], "g",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, sa),
             helper.make_tensor_value_info("B", TensorProto.FLOAT, sb)],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, want.shape)])
        proto = ex.einsums_to_matmuls(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
        ops = [n.op_type for n in proto.graph.node]
        assert ("Einsum" in ops) == (eq == "abc,abd->cd"), (eq, ops)  # two contracted dims: kept
        if (eq, sa) in [(e, s[0]) for e, s in unit.items()]:  # unit dims moved without a copy
            assert ops.count("Transpose") <= 2 and ops[-1] != "Transpose", (eq, ops)
        got = ort.InferenceSession(proto.SerializeToString()).run(None, {"A": a, "B": b})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=eq)


@pytest.mark.skipif(not HAVE_ONNX, reason="needs onnx + onnxruntime")
def test_einsum_then_transpose_is_one_plan():
    """An Einsum read by a Transpose alone (jax's dot_general order, then the einsum's): the
    Transpose goes into the MatMul plan. PVTv2's ``attn @ v`` with one head per half ([B, 1, N, Nk]
    maps, jax's ``bhnm,bmhd->bhdn`` then ``[0, 3, 1, 2]``) then moves only unit dims: no
    Transpose at all (the two that were there moved ``[B, N, d]`` out and back); the values are
    np.einsum's. An Einsum with a second reader keeps its order (one Transpose of its own) and
    both Transposes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 1, 9, 4)).astype(np.float32)
    b = rng.standard_normal((2, 4, 1, 3)).astype(np.float32)
    want = np.einsum("bhnm,bmhd->bnhd", a, b)
    for extra in (False, True):
        nodes = [helper.make_node("Einsum", ["A", "B"], ["E"], equation="bhnm,bmhd->bhdn"),
                 helper.make_node("Transpose", ["E"], ["Y"], perm=[0, 3, 1, 2])]
        outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, want.shape)]
        if extra:
            nodes.append(helper.make_node("Transpose", ["E"], ["Z"], perm=[0, 1, 3, 2]))
            outputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, (2, 1, 9, 3)))
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, a.shape),
                                               helper.make_tensor_value_info("B", TensorProto.FLOAT, b.shape)],
                                  outputs)
        proto = ex.einsums_to_matmuls(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
        ops = [n.op_type for n in proto.graph.node]
        assert "Einsum" not in ops and ops.count("Transpose") == (3 if extra else 0), ops
        got = ort.InferenceSession(proto.SerializeToString()).run(None, {"A": a, "B": b})
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
        if extra:
            np.testing.assert_allclose(got[1], want.transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-5)
