"""Deploy-form model -> files other runtimes run: serialized StableHLO and ONNX.

Both take exactly the JAX model's input, NHWC float32 images normalized as the model card's
``input`` says (``(x / 255 - mean) / std`` at ``input_size``), with a dynamic batch size, and
return the logits ``[B, num_classes]``. The variables are baked in as constants.

* ``model.jaxexport``: a serialized :class:`jax.export.Exported` lowered for CPU, CUDA and TPU
  with a symbolic batch dimension. A program that has JAX but not this package runs it with::

      exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
      logits = exported.call(images)          # images: float32 [B, H, W, 3]

* ``model.onnx``: ONNX (opset 23) written by ``jax2onnx`` (``pip install 'halluvit-jax[onnx]'``),
  input ``images`` ``[B, H, W, 3]``, output ``logits``; run it with onnxruntime. Einsums are
  rewritten as MatMul and LayerNorm / softmax / GELU as ``LayerNormalization`` / ``Softmax`` /
  ``Gelu``, the ops onnxruntime's fusions start from, Transposes of Transposes composed, what
  the weights alone determine computed once, and the per-channel affine after a Conv or a
  MatMul (an inference BatchNorm, a bias) folded into its weights
  (:mod:`~halluvit_jax.convert.onnx_fusions`).

What is exported is the model with stock JAX ops (the fused CPU kernels branch on the batch
size, which a symbolic batch cannot answer): ``impl='plain'`` for StableHLO and
``impl='accel'`` (``ONNX_IMPL``) for ONNX, where hMHSA's hallucination runs on the keys
(:mod:`halluvit_jax.layers.attention_accel`; a model without hMHSA is the same program either
way), which onnxruntime ran faster than the plain core for all three hal models
(docs/conversion.md); ``model.apply`` on the batch
(``batching='direct'``, the default) or ``jax.vmap`` over a one-image application
(``batching='vmap'``: model code that branches on the batch size sees 1). Every written file is checked against
``model.apply`` at two batch sizes (:func:`check_export`); a relative logit error above
``MAX_EXPORT_ERROR`` raises :class:`~halluvit_jax.convert.state_dict.ConversionError` and writes nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from halluvit_jax.convert.onnx_fusions import (fold_bias_past_matmul, fold_channel_affine,
                                                fold_constants, fold_scalar_mul, fold_transposes,
                                                fuse_native_ops, ihh_channel_layout, max_zero_as_relu,
                                                pad_conv_channels, pointwise_as_conv, static_reshapes,
                                                unit_transposes_as_reshapes)
from halluvit_jax.convert.state_dict import ConversionError
from halluvit_jax.layers.config import trace_target

STABLEHLO_NAME = "model.jaxexport"
ONNX_NAME = "model.onnx"
PLATFORMS = ("cpu", "cuda", "tpu")
#: Formats `convert deploy --format` accepts; 'orbax' (variables + safetensors + card) is always written.
FORMATS = ("orbax", "stablehlo", "onnx")
FILES = {"stablehlo": STABLEHLO_NAME, "onnx": ONNX_NAME}
MAX_EXPORT_ERROR = 1e-4  # relative to the largest |logit|
ONNX_OPSET = 23
CHECK_BATCHES = (1, 3)
#: The ``impl`` of the ONNX export: hMHSA's key-side core, no batch-size branches.
ONNX_IMPL = "accel"


def plain_model(model: Any, impl: str = "plain") -> Any:
    """The model with ``impl`` (default ``'plain'``: stock JAX ops, no fused kernels) where it
    has that field."""
    fields = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else set()
    return model.clone(impl=impl) if "impl" in fields else model


def inference_fn(model: Any, variables: Mapping[str, Any], batching: str = "direct",
                 impl: str = "plain") -> Callable:
    """``images [B, H, W, 3] -> logits [B, K]`` with the variables closed over (eval mode), the
    model on path ``impl``."""
    model = plain_model(model, impl)
    variables = {k: v for k, v in dict(variables).items() if k in ("params", "batch_stats")}
    if batching == "direct":
        return lambda x: model.apply(variables, x)
    if batching != "vmap":
        raise ValueError(f"batching must be 'vmap' or 'direct', got {batching!r}")
    return jax.vmap(lambda x: model.apply(variables, x[None])[0])


# --------------------------------------------------------------------------------------------
# StableHLO (jax.export).
# --------------------------------------------------------------------------------------------


def export_stablehlo(model: Any, variables: Mapping[str, Any], size: int | Sequence[int], *,
                     platforms: Iterable[str] = PLATFORMS, batching: str = "direct"):
    """A :class:`jax.export.Exported` of the model for ``platforms`` with a symbolic batch."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    (batch,) = jax.export.symbolic_shape("batch")
    fn = jax.jit(inference_fn(model, variables, batching))
    spec = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
    return jax.export.export(fn, platforms=tuple(platforms))(spec)


def write_stablehlo(path: str | os.PathLike, model: Any, variables: Mapping[str, Any],
                    size: int, **kwargs: Any) -> dict[str, Any]:
    """Writes ``export_stablehlo(...).serialize()`` to ``path``; returns what the card records."""
    exported = export_stablehlo(model, variables, size, **kwargs)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    return {"platforms": list(exported.platforms), "batch": "dynamic",
            "input_shape": ["batch", size, size, 3]}


def run_stablehlo(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return np.asarray(exported.call(np.asarray(x, np.float32)))


# --------------------------------------------------------------------------------------------
# ONNX (jax2onnx).
# --------------------------------------------------------------------------------------------


def export_onnx(model: Any, variables: Mapping[str, Any], size: int, *, batching: str = "direct",
                opset: int = ONNX_OPSET, name: str = "halluvit", impl: str = ONNX_IMPL,
                target: str = "onnx"):
    """An ``onnx.ModelProto``: input ``images`` float32 ``[B, size, size, 3]``, output ``logits``
    (the model on path ``impl``, its attention layers traced for ``target``:
    :func:`~halluvit_jax.layers.config.trace_target`; ``"xla"`` gives the program XLA runs)."""
    try:
        from jax2onnx import to_onnx
    except ImportError as err:
        raise ConversionError(
            f"ONNX export needs jax2onnx ({err}); pip install 'halluvit-jax[onnx]'.") from None

    (batch,) = jax.export.symbolic_shape("B")
    spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    # Traced here, outside jax2onnx's plugin world, and replayed there on the same symbolic
    # batch dimension: jax2onnx then converts lax primitives only. Its flax plugins would
    # otherwise replace nn.Conv by a primitive without a batching rule (no vmap) and
    # nn.avg_pool / nn.pool by ones that accept only padding='SAME' | 'VALID' (NextViT pools
    # with explicit ((0, h % 2), (0, w % 2)) padding, timm's ceil mode).
    # The attention layers' ONNX programs (fewer, larger ops: onnxruntime fuses little).
    with trace_target(target):
        closed = jax.make_jaxpr(inference_fn(model, variables, batching, impl))(spec)
    fn = lambda x: jax.core.eval_jaxpr(closed.jaxpr, closed.consts, x)[0]
    serde = logging.getLogger("onnx_ir.serde")  # one warning per shape constant otherwise
    level = serde.level
    serde.setLevel(logging.ERROR)
    try:
        return to_onnx(fn, inputs=[spec], model_name=name, opset=opset,
                       input_names=["images"], output_names=["logits"])
    finally:
        serde.setLevel(level)


def _einsum_as_matmul(equation: str, sizes: Mapping[str, int | None] | None = None):
    """A plan expressing a two-operand einsum as Transpose/Unsqueeze -> MatMul -> Squeeze/
    Transpose/Unsqueeze, or None: ``(lhs_perm, lhs_unsqueeze, rhs_perm, rhs_unsqueeze,
    squeeze, perm, unsqueeze)`` (``perm`` None when no Transpose is needed).

    Indices in both operands and the output are batch dims, one index in both operands only is
    the contraction K, indices of one operand and the output are that side's free dims. The
    MatMul operands are ``lhs [*batch, *L', 1..1 (R'), M, K]`` and ``rhs [*batch, 1..1 (L'),
    *R', K, N]`` (ONNX MatMul broadcasts the leading dims), ``M`` / ``N`` the free dim of each
    side that ``sizes`` (index -> static size, None for symbolic) says is largest and ``L'``,
    ``R'`` the others; a side without free dims gets a unit M or N. Unit dims of the result are
    squeezed before and unsqueezed after the output Transpose, which then moves data only when
    the non-unit dims change order.
    """
    if "..." in equation or "->" not in equation:
        return None
    ins, out = equation.replace(" ", "").split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if any(len(set(t)) != len(t) for t in (a, b, out)) or not set(out) <= set(a) | set(b):
        return None
    batch = [i for i in out if i in a and i in b]
    contracted = [i for i in a if i in b and i not in out]
    if len(contracted) != 1 or any(i not in b and i not in out for i in a) or any(
            i not in a and i not in out for i in b):
        return None
    sizes = dict(sizes or {})
    k = contracted[0]

    def split(free):  # (others, [M or N]): the operand's last free dim that is not a unit dim
        if not free:
            return [], []
        m = ([i for i in free if sizes.get(i) != 1] or free)[-1]
        return [i for i in free if i != m], [m]

    left_rest, m = split([i for i in a if i in out and i not in b])
    right_rest, n = split([i for i in b if i in out and i not in a])
    nb, nl, nr = len(batch), len(left_rest), len(right_rest)
    lhs_order = batch + left_rest + m + [k]
    rhs_order = batch + right_rest + [k] + n
    lhs_unsq = [nb + nl + j for j in range(nr)] + ([] if m else [nb + nl + nr])
    rhs_unsq = [nb + j for j in range(nl)] + ([] if n else [nb + nl + nr + 1])
    res = batch + left_rest + right_rest + (m or ["<m>"]) + (n or ["<n>"])
    unit = {"<m>", "<n>"} | {i for i in res if sizes.get(i) == 1}
    kept = [i for i in res if i not in unit]
    perm = [kept.index(i) for i in out if i not in unit]
    return ([a.index(i) for i in lhs_order], lhs_unsq, [b.index(i) for i in rhs_order], rhs_unsq,
            [j for j, i in enumerate(res) if i in unit],
            None if perm == sorted(perm) else perm,
            [j for j, i in enumerate(out) if i in unit])


def _static_shapes(graph) -> dict[str, list[int | None]]:
    """Tensor name -> dims (None where symbolic or unknown) from the graph's type information."""
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None
                              for d in v.type.tensor_type.shape.dim]
    return shapes


def _moved(plan, first: str, second: str, out: str, sizes) -> float:
    """Elements the Transposes of ``plan`` copy (``first``/``second``: the labels of its MatMul
    operands; a dim of unknown size counted as 64)."""
    n = lambda idx: float(np.prod([sizes.get(i) or 64 for i in idx]))  # noqa: E731
    lperm, _, rperm, _, _, perm, _ = plan
    copies = lambda lab, p: 0.0 if _unit_moves(lab, p, sizes) is not None else n(lab)  # noqa: E731
    return copies(first, lperm) + copies(second, rperm) + (n(out) if perm is not None else 0)


def _unit_moves(labels: str, perm: list[int], sizes) -> tuple[list[int], list[int]] | None:
    """``(squeeze, unsqueeze)`` axes doing ``perm`` without a copy when it only moves unit dims
    (``([], [])`` for the identity), else None."""
    order = [labels[i] for i in perm]
    unit = {i for i in labels if sizes.get(i) == 1}
    if [i for i in labels if i not in unit] != [i for i in order if i not in unit]:
        return None
    if order == list(labels):
        return [], []
    return ([j for j, i in enumerate(labels) if i in unit],
            [j for j, i in enumerate(order) if i in unit])


def einsums_to_matmuls(proto):
    """Rewrites every two-operand Einsum that :func:`_einsum_as_matmul` can express as MatMul
    (onnxruntime's CPU Einsum was 1.6-2x slower than MatMul on the same products: DeiT-S spent
    183 ms of 238 in Einsum). Same values up to float rounding."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    shapes = _static_shapes(graph)
    nodes, changed = [], 0
    # An Einsum read by one Transpose alone (jax writes dot_general's output order, then a
    # Transpose to the einsum's): the Transpose goes into the equation's output, so that the
    # MatMul's plan writes the final order with at most one Transpose of its own.
    readers = collections.Counter(x for n in graph.node for x in n.input)
    readers.update(o.name for o in graph.output)
    then = {n.input[0]: (j, n) for j, n in enumerate(graph.node)
            if n.op_type == "Transpose" and readers[n.input[0]] == 1}
    absorbed: set[int] = set()

    def const(name, values):
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    for i, node in enumerate(graph.node):
        if i in absorbed:
            continue
        eq = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "equation"),
                  None) if node.op_type == "Einsum" else None
        eq = eq.decode() if isinstance(eq, bytes) else eq
        plan, output = None, node.output[0] if node.output else None
        at, after = then.get(output, (None, None)) if eq and "->" in eq else (None, None)
        perm = next((list(helper.get_attribute_value(a)) for a in after.attribute if a.name == "perm"),
                    None) if after is not None else None
        ins, out = eq.replace(" ", "").split("->") if after is not None else (None, None)
        if perm is not None and len(perm) == len(out):
            eq, output = ins + "->" + "".join(out[j] for j in perm), after.output[0]
        if eq and len(node.input) == 2 and "->" in eq:
            sizes: dict[str, int | None] = {}
            for operand, labels in zip(node.input, eq.split("->")[0].split(",")):
                shape = shapes.get(operand)
                if shape is not None and len(shape) == len(labels):
                    sizes.update({i: d for i, d in zip(labels, shape) if d})
            ins, out = eq.split("->")
            la, lb = ins.split(",")
            options = [(_einsum_as_matmul(f"{x},{y}->{out}", sizes), inputs, x, y)
                       for x, y, inputs in ((la, lb, list(node.input)),
                                            (lb, la, list(node.input)[::-1]))]
            options = [o for o in options if o[0] is not None]
            if options:  # the operand order whose Transposes copy the fewest elements
                plan, inputs, la, lb = min(options, key=lambda o: _moved(o[0], o[2], o[3], out, sizes))
        if plan is None:
            nodes.append(node)
            continue
        if output != node.output[0]:
            absorbed.add(at)
        lperm, lunsq, rperm, runsq, squeeze, perm, unsqueeze = plan
        tag = f"{node.name or 'einsum'}_{changed}_mm"
        operands = []
        for side, x, p, unsq, lab in (("l", inputs[0], lperm, lunsq, la),
                                      ("r", inputs[1], rperm, runsq, lb)):
            moves = _unit_moves(lab, p, sizes)
            if moves is not None and moves[0]:  # only unit dims move: no copy
                nodes.append(helper.make_node("Squeeze", [x, const(f"{tag}_{side}sq", moves[0])],
                                              [f"{tag}_{side}s"]))
                nodes.append(helper.make_node("Unsqueeze", [f"{tag}_{side}s",
                                                            const(f"{tag}_{side}us", moves[1])],
                                              [f"{tag}_{side}t"]))
                x = f"{tag}_{side}t"
            elif moves is None:
                nodes.append(helper.make_node("Transpose", [x], [f"{tag}_{side}t"], perm=p))
                x = f"{tag}_{side}t"
            # MatMul broadcasting prepends missing unit dims: drop leading unit batch dims.
            while unsq and unsq[0] == 0 and len(p) + len(unsq) > 2:
                unsq = [u - 1 for u in unsq[1:]]
            if unsq:
                nodes.append(helper.make_node("Unsqueeze", [x, const(f"{tag}_{side}axes", unsq)],
                                              [f"{tag}_{side}u"]))
                x = f"{tag}_{side}u"
            operands.append(x)
        steps = [("Squeeze", squeeze)] * bool(squeeze) + [("Transpose", perm)] * bool(perm) + [
            ("Unsqueeze", unsqueeze)] * bool(unsqueeze)
        y = output if not steps else f"{tag}_y"
        nodes.append(helper.make_node("MatMul", operands, [y]))
        for j, (op, arg) in enumerate(steps):
            z = output if j == len(steps) - 1 else f"{tag}_{op}"
            if op == "Transpose":
                nodes.append(helper.make_node(op, [y], [z], perm=arg))
            else:
                nodes.append(helper.make_node(op, [y, const(f"{tag}_{op}_axes", arg)], [z]))
            y = z
        changed += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def graph_passes(proto) -> dict[str, Any]:
    """Runs, in place, every pass `write_onnx` makes over jax2onnx's graph, in order: Einsums as
    MatMul (:func:`einsums_to_matmuls`), LayerNorm / softmax / GELU as their native ops
    (:func:`~halluvit_jax.convert.onnx_fusions.fuse_native_ops`), Transposes of Transposes
    composed (:func:`~halluvit_jax.convert.onnx_fusions.fold_transposes`), the plain core's IHH
    conv over ``[B, N*heads, Hk, Wk]`` channels
    (:func:`~halluvit_jax.convert.onnx_fusions.ihh_channel_layout`), what the weights alone
    determine computed once (:func:`~halluvit_jax.convert.onnx_fusions.fold_constants`),
    Reshape targets as constants rather than computed from the batch size at run time
    (:func:`~halluvit_jax.convert.onnx_fusions.static_reshapes`), Dense layers over NHWC maps
    as the 1x1 Convs they are (:func:`~halluvit_jax.convert.onnx_fusions.pointwise_as_conv`),
    ``Max(x, 0)`` as ``Relu`` (:func:`~halluvit_jax.convert.onnx_fusions.max_zero_as_relu`),
    each per-channel affine after a Conv or a MatMul folded into its weights
    (:func:`~halluvit_jax.convert.onnx_fusions.fold_channel_affine`), attention's scale on q
    folded into q's projection (:func:`~halluvit_jax.convert.onnx_fusions.fold_scalar_mul`),
    the bias of the first of two Dense layers moved past the second
    (:func:`~halluvit_jax.convert.onnx_fusions.fold_bias_past_matmul`), the Transposes
    that leaves back to back composed again, and those that move only unit dims written as
    Reshapes (:func:`~halluvit_jax.convert.onnx_fusions.unit_transposes_as_reshapes`), and the
    channels between two Convs (the cFFN's factors on maps) padded to whole NCHWc blocks
    (:func:`~halluvit_jax.convert.onnx_fusions.pad_conv_channels`). Returns
    what each changed (its count, or per op for ``fuse_native_ops``; ``fold_transposes`` summed
    over its two runs)."""
    einsums = lambda: sum(n.op_type == "Einsum" for n in proto.graph.node)  # noqa: E731
    before = einsums()
    einsums_to_matmuls(proto)
    done: dict[str, Any] = {"einsums_to_matmuls": before - einsums()}
    for name, fn in (("fuse_native_ops", fuse_native_ops), ("fold_transposes", fold_transposes),
                     ("ihh_channel_layout", ihh_channel_layout), ("fold_constants", fold_constants),
                     ("static_reshapes", static_reshapes),
                     ("pointwise_as_conv", pointwise_as_conv), ("max_zero_as_relu", max_zero_as_relu),
                     ("fold_channel_affine", fold_channel_affine),
                     ("fold_scalar_mul", fold_scalar_mul),
                     ("fold_bias_past_matmul", fold_bias_past_matmul),
                     ("fold_transposes", fold_transposes),
                     ("unit_transposes_as_reshapes", unit_transposes_as_reshapes),
                     ("pad_conv_channels", pad_conv_channels)):
        changed = fn(proto)
        done[name] = changed + done[name] if name in done else changed
    return done


def write_onnx(path: str | os.PathLike, model: Any, variables: Mapping[str, Any], size: int,
               **kwargs: Any) -> dict[str, Any]:
    """Writes the ONNX export after :func:`graph_passes`; returns what the card records."""
    proto = export_onnx(model, variables, size, **kwargs)
    graph_passes(proto)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return {"opset": int(max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))),
            "input": "images", "output": "logits", "batch": "dynamic",
            "input_shape": ["B", size, size, 3], "impl": kwargs.get("impl", ONNX_IMPL)}


def optimize_onnx(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, int]:
    """Runs onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer``, model
    type ``vit``, its default fusions, CPU) on the ONNX file ``path`` and writes the result to
    ``out``; returns the op counts it changed (``{op: after - before}``, ops like
    ``SkipLayerNormalization`` / ``BiasGelu`` from the ``com.microsoft`` domain included)."""
    try:
        import onnx
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as err:
        raise ConversionError(f"--optimize needs onnxruntime's transformers package ({err}).") from None
    before = collections.Counter(n.op_type for n in onnx.load(os.fspath(path)).graph.node)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    optimized = optimize_model(os.fspath(path), model_type="vit", num_heads=0, hidden_size=0,
                               opt_level=0, use_gpu=False)
    optimized.save_model_to_file(os.fspath(out))
    after = collections.Counter(n.op_type for n in optimized.model.graph.node)
    return {op: after[op] - before[op] for op in sorted(set(before) | set(after))
            if after[op] != before[op]}


OPTIMIZED_ONNX_NAME = "model.optimized.onnx"


def write_optimized(directory: str | os.PathLike, *, batches: Sequence[int] = CHECK_BATCHES,
                    seed: int = 0) -> dict[str, Any]:
    """``convert deploy --optimize``: :func:`optimize_onnx` of ``directory/model.onnx`` written
    next to it as ``model.optimized.onnx``, checked against ``model.onnx`` on standard normal
    images at each of ``batches`` (max relative logit error, refused above
    ``MAX_EXPORT_ERROR``); returns ``{'file', 'fused', 'max_rel_logit_error_vs_onnx'}``."""
    src = os.path.join(os.fspath(directory), ONNX_NAME)
    out = os.path.join(os.fspath(directory), OPTIMIZED_ONNX_NAME)
    if not os.path.isfile(src):
        raise ConversionError("--optimize needs the onnx export (--format onnx).")
    fused = optimize_onnx(src, out)
    rng = np.random.default_rng(seed)
    plain, optimized = onnx_session(src), onnx_session(out)
    size = plain.get_inputs()[0].shape[1]
    worst = 0.0
    for b in batches:
        x = rng.normal(size=(b, size, size, 3)).astype(np.float32)
        want = run_onnx(plain, x).astype(np.float64)
        got = run_onnx(optimized, x).astype(np.float64)
        worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)))
    if not worst < MAX_EXPORT_ERROR:
        os.remove(out)
        raise ConversionError(f"the optimized ONNX graph differs from model.onnx by {worst:.2e} "
                              "(relative logits); not written.")
    return {"file": OPTIMIZED_ONNX_NAME, "fused": fused, "max_rel_logit_error_vs_onnx": worst}


def onnx_session(path: str | os.PathLike | bytes, threads: int | None = None, *, arena: bool = True):
    """An onnxruntime CPU session of a file or of a serialized model (``bytes``);
    ``arena=False`` returns activation memory after each run (many sessions kept open at a
    large batch would otherwise each keep their peak)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ConversionError(
            f"Checking the ONNX export needs onnxruntime ({err}); pip install 'halluvit-jax[onnx]'."
        ) from None
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    model = path if isinstance(path, bytes) else os.fspath(path)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def run_onnx(path_or_session: Any, x: np.ndarray) -> np.ndarray:
    sess = path_or_session if hasattr(path_or_session, "run") else onnx_session(path_or_session)
    return sess.run(None, {sess.get_inputs()[0].name: np.asarray(x, np.float32)})[0]


# --------------------------------------------------------------------------------------------
# Checks and the deploy hook.
# --------------------------------------------------------------------------------------------

RUNNERS = {"stablehlo": run_stablehlo, "onnx": run_onnx}
WRITERS = {"stablehlo": write_stablehlo, "onnx": write_onnx}


def reference_logits(model: Any, variables: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    variables = {k: v for k, v in dict(variables).items() if k in ("params", "batch_stats")}
    return np.asarray(jax.jit(model.apply)(variables, x))


def check_export(fmt: str, path: str | os.PathLike, model: Any, variables: Mapping[str, Any],
                 size: int, *, batches: Sequence[int] = CHECK_BATCHES, seed: int = 0) -> float:
    """Max relative logit error of the file at ``path`` against ``model.apply``, over standard
    normal images at each of ``batches`` (relative to the largest |logit|)."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for b in batches:
        x = rng.normal(size=(b, size, size, 3)).astype(np.float32)
        want = reference_logits(model, variables, x).astype(np.float64)
        got = np.asarray(RUNNERS[fmt](path, x), np.float64)
        if got.shape != want.shape:
            raise ConversionError(f"{fmt} export returns {got.shape} for a batch of {b}, "
                                  f"JAX {want.shape}; not exported.")
        worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)))
    return worst


def write_formats(formats: Iterable[str], directory: str | os.PathLike, model: Any,
                  variables: Mapping[str, Any], size: int) -> dict[str, Any]:
    """Writes and checks each non-orbax format into ``directory``; returns the card entries
    ``{'files': {fmt: name}, 'check': {...}, 'export': {fmt: info}}``."""
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConversionError(f"Unknown export format(s) {unknown}; choose from {list(FORMATS)}.")
    os.makedirs(directory, exist_ok=True)
    out: dict[str, Any] = {"files": {}, "check": {}, "export": {}}
    for fmt in formats:
        if fmt == "orbax":
            continue
        path = os.path.join(os.fspath(directory), FILES[fmt])
        info = WRITERS[fmt](path, model, variables, size)
        err = check_export(fmt, path, model, variables, size)
        if not err < MAX_EXPORT_ERROR:
            raise ConversionError(f"{fmt} export differs from JAX by {err:.2e} (relative logits); "
                                  "not exported.")
        out["files"][fmt] = FILES[fmt]
        out["check"][f"max_rel_logit_error_{fmt}_vs_jax"] = err
        out["export"][fmt] = info
    return out


def parse_formats(values: Iterable[str] | str | None) -> list[str]:
    """``['onnx,stablehlo', 'orbax']`` -> ``['onnx', 'stablehlo', 'orbax']`` (validated)."""
    if values is None:
        return ["orbax"]
    if isinstance(values, str):
        values = [values]
    out = [p.strip().lower() for v in values for p in v.split(",") if p.strip()]
    unknown = [f for f in out if f not in FORMATS]
    if unknown:
        raise ConversionError(f"Unknown --format {unknown}; choose from {', '.join(FORMATS)}.")
    return list(dict.fromkeys(out)) or ["orbax"]


__all__ = ["FORMATS", "MAX_EXPORT_ERROR", "ONNX_IMPL", "ONNX_NAME", "PLATFORMS", "STABLEHLO_NAME",
           "check_export", "export_onnx", "graph_passes", "optimize_onnx", "export_stablehlo", "inference_fn", "onnx_session",
           "parse_formats", "plain_model", "write_optimized", "run_onnx", "run_stablehlo", "write_formats",
           "write_onnx", "write_stablehlo"]
