"""Parameter and MAC counts read from the traced model (docs/design.md section 4).

MACs ("FLOPs" in the paper's, DeiT's, PVT's and fvcore's sense) are the multiply-accumulates of
matmuls and convolutions. They are counted from the model itself: `model.apply` is traced with
`jax.make_jaxpr` on abstract inputs (variables from `jax.eval_shape`, so nothing is allocated
and full-size models are cheap), and the jaxpr is walked, sub-jaxprs included:

- `dot_general`: output elements x contraction size (batch x free x contracting dims). This
  covers Dense layers, einsums and the attention matmuls `q k^T` and `attn v`.
- `conv_general_dilated`: output elements x kernel taps x input features per group.
- IHH (hMHSA's 3x3 depthwise conv over the key grid) is written as nine shifted elementwise
  multiply-adds for speed, inside the named scope `ihh_depthwise_conv`
  (`halluvit_jax.layers.attention.IHH_SCOPE`). Every `mul` inside that scope counts one MAC
  per output element, i.e. 9 per hallucinated grid logit, which is what `lax.conv` would
  report. Pass-through class-token columns are not multiplied and so not counted.
- CHH (a 1x1 conv across heads) is likewise written as scalar multiply-adds of whole maps, in
  the named scope `chh_head_mixing` (`CHH_SCOPE`); its multiplies count as MACs, which equals
  the einsum's count (output elements x input heads). PVTv2's FFN depthwise 3x3 conv is written
  the same way in the scope `depthwise_conv3x3` (`DWCONV_SCOPE`).
- Everything else (softmax, norms, activations, additions, bias adds, pooling) counts zero.
- Sub-jaxprs (pjit, closed_call, remat, custom_jvp/vjp) count once, `scan` bodies `length`
  times, `cond` the costliest branch, `while` bodies once (their trip count is unknown when
  tracing; no model here uses one).

Counts are per image: the CLI and `model_complexity` trace batch 1.

CLI::

    python -m halluvit_jax.complexity --models deit_tiny,deit_tiny_hal [--resolution 224] [--json]
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halluvit_jax.cli import ArgumentParser, run_main
from halluvit_jax.layers.fused import CHH_SCOPE, DWCONV_SCOPE, IHH_SCOPE
from halluvit_jax.models import create_model, deploy_form, get_input_config, list_models

__all__ = [
    "Complexity",
    "complexity_table",
    "count_macs",
    "count_params",
    "format_table",
    "jaxpr_macs",
    "main",
    "model_complexity",
]

FORMS = ("train", "deploy")
PAPER_MODELS = (
    "deit_tiny", "deit_tiny_hal", "deit_small", "deit_small_hal",
    "pvt_v2_b1", "pvt_v2_b1_hal", "nextvit_small", "nextvit_small_hal",
)


# ----------------------------------------------------------------------------------------------
# Parameters


def _numel(x: Any) -> int:
    return math.prod(getattr(x, "shape", ()))


def count_params(variables_or_shapes: Any) -> int:
    """Number of scalars in the 'params' collection (batch_stats etc. are not parameters).

    Takes a variables dict `{'params': ..., 'batch_stats': ...}` or a bare params tree; leaves
    may be arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape(model.init, ...)`).
    """
    tree = variables_or_shapes
    if isinstance(tree, Mapping) and "params" in tree:
        tree = tree["params"]
    return sum(_numel(leaf) for leaf in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------------------------
# MACs from a jaxpr


def _sub_jaxprs(value: Any) -> Iterable[Any]:
    """Jaxprs held in an equation parameter (a Jaxpr, ClosedJaxpr, or tuples/lists of them)."""
    if hasattr(value, "eqns"):  # Jaxpr
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):  # ClosedJaxpr
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _dot_general_macs(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    return _numel(eqn.outvars[0].aval) * math.prod(lhs_shape[d] for d in lhs_contract)


def _conv_macs(eqn) -> int:
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
    rhs_shape = eqn.invars[1].aval.shape
    per_output = rhs_shape[rhs_spec[1]] * math.prod(rhs_shape[d] for d in rhs_spec[2:])
    return _numel(eqn.outvars[0].aval) * per_output


def _walk(jaxpr, in_ihh: bool) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        names = str(eqn.source_info.name_stack)
        scoped = in_ihh or any(scope in names for scope in (IHH_SCOPE, CHH_SCOPE, DWCONV_SCOPE))
        if prim == "dot_general":
            total += _dot_general_macs(eqn)
        elif prim == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif prim == "mul" and scoped:
            total += _numel(eqn.outvars[0].aval)
        if prim == "scan":
            total += eqn.params["length"] * _walk(eqn.params["jaxpr"].jaxpr, scoped)
        elif prim == "cond":
            total += max(_walk(b.jaxpr, scoped) for b in eqn.params["branches"])
        else:  # pjit, closed_call, remat, custom_jvp_call, custom_vjp_call, while, ...
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += _walk(sub, scoped)
    return total


def jaxpr_macs(closed_jaxpr) -> int:
    """MACs of a (closed) jaxpr under the rules of this module's docstring."""
    return _walk(getattr(closed_jaxpr, "jaxpr", closed_jaxpr), False)


# ----------------------------------------------------------------------------------------------
# MACs of a Flax module


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def count_macs(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    variables: Any = None,
    train: bool = False,
    method: str | Callable | None = None,
    input_dtype: Any = jnp.float32,
    **call_kwargs: Any,
) -> int:
    """MACs of one `model.apply(variables, x, **call_kwargs)` on an input of `input_shape`.

    Nothing is computed: `variables` (arrays or ShapeDtypeStructs; default: the abstract init)
    and the input are abstract, and the traced jaxpr is counted by `jaxpr_macs`. The count is for
    the whole input, so pass batch 1 for per-image numbers. `train` is forwarded to the module
    when its method takes it (train mode makes the non-params collections mutable). Keyword
    arguments that are `jax.ShapeDtypeStruct`s are passed as abstract arrays (e.g. `kv=`).

    The count is the math's (docs/design.md): a module built with ``impl`` ``"auto"``,
    ``"accel"`` or ``"pallas"`` is counted as ``impl="plain"`` (``"accel"``, which ``"auto"``
    picks on TPU and CUDA, computes the hallucinated heads' logits as a matmul against
    transformed keys: more multiplies than the hallucination itself). ``"fused"`` is counted as
    it runs: its scoped shifted multiply-adds count as the plain path's convolutions do.
    """
    if getattr(model, "impl", None) in ("auto", "accel", "pallas"):
        model = model.clone(impl="plain")
    if any(not isinstance(d, int) or d < 1 for d in input_shape):
        raise ValueError(
            f"input_shape must be positive ints such as (1, 224, 224, 3), got {input_shape!r}."
        )
    x = jax.ShapeDtypeStruct(tuple(input_shape), input_dtype)
    dynamic_names = [k for k, v in call_kwargs.items() if isinstance(v, jax.ShapeDtypeStruct)]
    static_kwargs = {k: v for k, v in call_kwargs.items() if k not in dynamic_names}
    dynamic = [call_kwargs[k] for k in dynamic_names]
    fn = getattr(model, method) if isinstance(method, str) else (method or model.__call__)
    train_kw = {"train": train} if _accepts(fn, "train") else {}

    def kwargs_of(dyn):
        return {**static_kwargs, **dict(zip(dynamic_names, dyn)), **train_kw}

    if variables is None:
        def init(x, *dyn):
            rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
            return model.init(rngs, x, method=method, **kwargs_of(dyn))

        variables = jax.eval_shape(init, x, *dynamic)
    variables = jax.tree_util.tree_map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), variables
    )
    mutable = [c for c in variables if c != "params"] if train else False

    def apply(variables, x, *dyn):
        return model.apply(
            variables, x, method=method, rngs={"dropout": jax.random.key(0)},
            mutable=mutable, **kwargs_of(dyn),
        )

    return jaxpr_macs(jax.make_jaxpr(apply)(variables, x, *dynamic))


# ----------------------------------------------------------------------------------------------
# Registered models


@dataclasses.dataclass(frozen=True)
class Complexity:
    """Size and compute of one registered model in one form, at one resolution, per image."""

    model: str
    form: str  # "train" (cFFN branches unfolded) or "deploy" (folded; NextViT with its pre-BNs)
    resolution: int
    params: int
    macs: int
    baseline: str | None = None
    params_change_pct: float | None = None  # (hal - baseline) / baseline * 100, same form
    macs_change_pct: float | None = None  # negative = the hal model is smaller


def _build(name: str, form: str, resolution: int):
    if form not in FORMS:
        raise ValueError(f"Unknown form {form!r}; choose one of {FORMS}.")
    model = create_model(name, impl="plain")  # the reference ops: one eqn per matmul/conv
    fields = {f.name for f in dataclasses.fields(model)}
    if form == "deploy":
        model = deploy_form(model)
        if "merge_pre_bn" in fields:
            # Counted as the papers and timm's param_count do: NextViT with its pre-BatchNorms
            # (the deploy export merges them into the next layers: 20,928 fewer params for S,
            # the same MACs, since BatchNorms and bias adds count none).
            model = model.clone(merge_pre_bn=False)
    if "img_size" in fields:
        model = model.clone(img_size=resolution)
    return model


def model_complexity(
    name: str, *, form: str = "deploy", resolution: int | None = None
) -> Complexity:
    """Params and per-image MACs of registered model `name` (default resolution: its config's)."""
    resolution = resolution or get_input_config(name).input_size
    model = _build(name, form, resolution)
    x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x), x
    )
    macs = count_macs(model, x.shape, variables=variables, train=False)
    return Complexity(name, form, resolution, count_params(variables), macs)


def _with_baselines(names: Sequence[str]) -> list[str]:
    """`names` in order, each `X_hal` preceded by its baseline `X` when `X` is registered."""
    registered = set(list_models())
    out: list[str] = []
    for name in names:
        base = name[: -len("_hal")] if name.endswith("_hal") else None
        if base and base in registered and base not in out and base not in names:
            out.append(base)
        if name not in out:
            out.append(name)
    return out


def _expand(patterns: Iterable[str]) -> list[str]:
    """Model names; shell patterns (`pvt_v2_*`) expand over the registry."""
    names: list[str] = []
    for pattern in patterns:
        matched = list_models(pattern) if any(c in pattern for c in "*?[") else [pattern]
        if not matched:
            raise ValueError(
                f"No registered model matches {pattern!r}; see halluvit_jax.list_models()."
            )
        names += [m for m in matched if m not in names]
    return names


def complexity_table(
    names: Sequence[str], *, resolution: int | None = None, forms: Sequence[str] = FORMS
) -> list[Complexity]:
    """Rows for every model and form; `X_hal` rows carry their change vs `X` (added if missing)."""
    rows = {}
    ordered = _with_baselines(_expand(names))
    for name in ordered:
        for form in forms:
            rows[name, form] = model_complexity(name, form=form, resolution=resolution)
    out = []
    for name in ordered:
        for form in forms:
            row = rows[name, form]
            base = rows.get((name[: -len("_hal")], form)) if name.endswith("_hal") else None
            if base is not None:
                row = dataclasses.replace(
                    row,
                    baseline=base.model,
                    params_change_pct=100.0 * (row.params - base.params) / base.params,
                    macs_change_pct=100.0 * (row.macs - base.macs) / base.macs,
                )
            out.append(row)
    return out


def format_table(rows: Sequence[Complexity]) -> str:
    """An aligned text table (params in M, MACs in G, reductions in % vs the baseline)."""
    header = ("model", "form", "res", "params (M)", "MACs (G)", "params vs base", "MACs vs base")
    pct = lambda v: "" if v is None else f"{v:+.2f}%"
    body = [
        (r.model, r.form, str(r.resolution), f"{r.params / 1e6:.3f}", f"{r.macs / 1e9:.3f}",
         pct(r.params_change_pct), pct(r.macs_change_pct))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    left = (True, True, False, False, False, False, False)

    def line(cells):
        cols = (c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(cells, widths, left))
        return "  ".join(cols).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0, or 2 with one ``error:`` line for a bad model name / flag (``--debug``: traceback)."""
    return run_main(_main, argv)


def _main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m halluvit_jax.complexity",
        description="Params and per-image MACs (matmul + conv multiply-accumulates, counted from "
        "the traced model) in training and deploy form, and each _hal model's reduction vs its "
        "baseline.",
    )
    parser.add_argument("--models", default=",".join(PAPER_MODELS),
                        help="comma-separated names or shell patterns (default: the paper's pairs)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="square input size (default: each model's input config, 224)")
    parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated: train,deploy")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.resolution is not None and args.resolution < 1:
        parser.error(f"--resolution must be positive, got {args.resolution}.")
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        parser.error(f"--forms takes a comma-separated subset of {','.join(FORMS)}, "
                     f"got {args.forms!r}.")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    try:
        rows = complexity_table(names, resolution=args.resolution, forms=forms)
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
