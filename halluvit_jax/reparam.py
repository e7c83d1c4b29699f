"""Training form -> deploy form: fold the BatchNorms of every cFFN factor into one Dense, and
merge NextViT's pre-BatchNorms into the linear layers they feed (timm's `merge_pre_bn`).

Pure functions over variable pytrees; no model object is needed.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

Variables = Mapping[str, Any]

_BRANCH_KERNEL = "branch_kernel"  # marks a RepDense in training form (see layers/mlp.py)


def fold_rep_dense(params: Mapping[str, Any], stats: Mapping[str, Any], epsilon: float = 1e-5):
    """Fold one RepDense: `sum_r BN_r(x @ K_r)` in eval mode -> `x @ K + b`.

    `params` = {'branch_kernel': [r, in, out], 'bn': {'scale', 'bias'} [r, out]},
    `stats` = {'bn': {'mean', 'var'}} [r, out]. Computed in float64, returned in the kernel dtype.
    With `s_r = scale_r / sqrt(var_r + eps)`: `K = sum_r K_r * s_r`, `b = sum_r (bias_r - mean_r * s_r)`.
    """
    kernel = np.asarray(params[_BRANCH_KERNEL])
    dtype = kernel.dtype
    k = kernel.astype(np.float64)
    scale = np.asarray(params["bn"]["scale"], np.float64)
    beta = np.asarray(params["bn"]["bias"], np.float64)
    mean = np.asarray(stats["bn"]["mean"], np.float64)
    var = np.asarray(stats["bn"]["var"], np.float64)
    s = scale / np.sqrt(var + epsilon)  # [r, out]
    fused_kernel = np.einsum("rio,ro->io", k, s)
    fused_bias = (beta - mean * s).sum(axis=0)
    return {"kernel": fused_kernel.astype(dtype), "bias": fused_bias.astype(dtype)}


def _is_rep_dense(tree: Any) -> bool:
    return isinstance(tree, Mapping) and _BRANCH_KERNEL in tree and "bn" in tree


def _fold_tree(params: Any, stats: Any, epsilon: float, path: tuple[str, ...]):
    """Returns (new_params, new_stats or None); stats of folded modules are removed."""
    if _is_rep_dense(params):
        if not isinstance(stats, Mapping) or "bn" not in stats:
            raise ValueError(
                f"RepDense at {'/'.join(path)} has no batch_stats; pass the full variables "
                "(params and batch_stats) of the training-form model to reparameterize()."
            )
        return fold_rep_dense(params, stats, epsilon), None
    if not isinstance(params, Mapping):
        return params, stats
    new_params, new_stats = {}, {}
    stats = stats if isinstance(stats, Mapping) else {}
    for name, sub in params.items():
        p, s = _fold_tree(sub, stats.get(name), epsilon, path + (name,))
        new_params[name] = p
        if s is not None and not (isinstance(s, Mapping) and not s):
            new_stats[name] = s
    # batch_stats of modules with no params of their own at this level (none in our models) stay.
    for name, sub in stats.items():
        if name not in params:
            new_stats[name] = sub
    return new_params, new_stats


# ---------------------------------------------------------------------------------------------
# NextViT's pre-BatchNorms (halluvit_jax.models.nextvit, merge_pre_bn).

_NCB_KEYS = ("mhca", "norm", "mlp")  # a Next Convolution Block's params, pre-norm unmerged
_NTB_KEYS = ("mhca", "norm1", "e_mhsa", "norm2", "mlp")  # a Next Transformer Block's


def _nextvit_block(params: Any) -> str | None:
    """'ncb' / 'ntb' for the params of a NextViT block whose pre-BatchNorms are not merged."""
    if not isinstance(params, Mapping):
        return None
    if all(k in params for k in _NTB_KEYS):
        return "ntb"
    return "ncb" if all(k in params for k in _NCB_KEYS) else None


def has_unmerged_pre_bn(params: Any) -> bool:
    """Whether ``params`` hold a NextViT block whose pre-BatchNorms `reparameterize` would merge."""
    if _nextvit_block(params):
        return True
    return isinstance(params, Mapping) and any(has_unmerged_pre_bn(v) for v in params.values())


def bn_affine(params: Mapping[str, Any], stats: Mapping[str, Any], epsilon: float):
    """Eval-mode BatchNorm as ``x * s + t`` (float64): ``s = scale / sqrt(var + eps)``, ``t = bias - mean * s``."""
    s = np.asarray(params["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + epsilon)
    return s, np.asarray(params["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * s


def merge_pre_affine(dense: Mapping[str, Any], s, t) -> dict[str, Any]:
    """``{'kernel' [in, out], 'bias'}`` of ``x -> (x * s + t) @ kernel + bias``: the kernel's input
    rows scaled by ``s``, ``t @ kernel`` added to the bias. Computed in float64, kernel dtype out."""
    if "bias" not in dense:
        raise ValueError("merging a BatchNorm into a Dense needs the Dense to have a bias.")
    kernel = np.asarray(dense["kernel"])
    k = kernel.astype(np.float64)
    bias = np.asarray(dense["bias"], np.float64) + t @ k
    return {**dense, "kernel": (s[:, None] * k).astype(kernel.dtype), "bias": bias.astype(kernel.dtype)}


def _first_mlp_layer(mlp: Mapping[str, Any], path: tuple[str, ...]) -> str:
    """The MLP's first linear layer: ``fc1`` (`Mlp`, cFFN on W2) or ``fc1a`` (cFFN on W1), folded."""
    name = "fc1" if "fc1" in mlp else "fc1a"
    if "kernel" not in mlp.get(name, {}):
        raise ValueError(f"{'/'.join(path)}/mlp has no folded first layer (fc1 / fc1a kernel) to merge into.")
    return name


def _merge_block(kind: str, params: Mapping[str, Any], stats: Mapping[str, Any], epsilon: float,
                 path: tuple[str, ...]):
    """One NextViT block's params and batch_stats with its pre-BatchNorms merged and removed."""
    norms = ("norm",) if kind == "ncb" else ("norm1", "norm2") + (("sr_norm",) if "sr_norm" in params else ())
    missing = [n for n in norms if not isinstance(stats.get(n), Mapping) or "var" not in stats[n]]
    if missing:
        raise ValueError(
            f"NextViT block {'/'.join(path)} has no batch_stats for {missing}; pass the full variables "
            "(params and batch_stats) of the training-form model to reparameterize().")
    affine = {n: bn_affine(params[n], stats[n], epsilon) for n in norms}
    params = {k: v for k, v in params.items() if k not in norms}
    stats = {k: v for k, v in stats.items() if k not in norms}
    mlp = dict(params["mlp"])
    fc1 = _first_mlp_layer(mlp, path)
    mlp[fc1] = merge_pre_affine(mlp[fc1], *affine["norm" if kind == "ncb" else "norm2"])
    params["mlp"] = mlp
    if kind == "ntb":
        attn = dict(params["e_mhsa"])
        s1, t1 = affine["norm1"]
        if "qkv" in attn:  # sr = 1: q, k and v all read norm1(x)
            attn["qkv"] = merge_pre_affine(attn["qkv"], s1, t1)
        else:  # k, v read sr_norm(pool(norm1(x))) = pool(x) * s1 s2 + (t1 s2 + t2): pooling is per channel, linear
            attn["q"] = merge_pre_affine(attn["q"], s1, t1)
            s2, t2 = affine.get("sr_norm", (np.ones_like(s1), np.zeros_like(t1)))
            attn["kv"] = merge_pre_affine(attn["kv"], s1 * s2, t1 * s2 + t2)
        params["e_mhsa"] = attn
    return params, stats


def _merge_tree(params: Any, stats: Any, epsilon: float, path: tuple[str, ...]):
    """(params, batch_stats) with every NextViT block's pre-BatchNorms merged."""
    stats = stats if isinstance(stats, Mapping) else {}
    kind = _nextvit_block(params)
    if kind:
        return _merge_block(kind, params, stats, epsilon, path)
    if not isinstance(params, Mapping):
        return params, stats
    new_params, new_stats = {}, dict(stats)
    for name, sub in params.items():
        p, s = _merge_tree(sub, stats.get(name), epsilon, path + (name,))
        new_params[name] = p
        if s:
            new_stats[name] = s
        else:
            new_stats.pop(name, None)
    return new_params, new_stats


def reparameterize(variables: Variables, *, epsilon: float = 1e-5) -> dict[str, Any]:
    """Return the deploy-form variables of a model in training form.

    - Every `RepDense` (the factors of `CompactMlp`) anywhere in `variables['params']` has its r
      branches and BatchNorms folded into `{'kernel', 'bias'}` and its `batch_stats` removed.
    - Every NextViT block (NCB / NTB, baseline or hal) has its pre-BatchNorms merged into the
      linear layers they feed, as timm's `merge_pre_bn` does: `norm` (NCB) / `norm2` (NTB) into
      the MLP's first layer, `norm1` into the E-MHSA's q (and qkv when sr = 1), `norm1` then
      `sr_norm` into kv; those BatchNorms' params and statistics are removed. NextViT's other
      BatchNorms (stem, patch embeddings, MHCA, final norm) keep theirs.

    All other collections and leaves are returned unchanged. The result is what
    `create_model(name, deploy=True).init` (`deploy_form(model)`) would create, so
    `model_deploy.apply(reparameterize(v), x)` equals `model_train.apply(v, x, train=False)`.
    `epsilon` must match the BatchNorm epsilon of the cFFN factors and of NextViT (1e-5 by
    default). Variables in deploy form come back unchanged (the fold is idempotent).
    """
    if "params" not in variables:
        raise ValueError("reparameterize() expects a variables dict with a 'params' collection.")
    params, stats = _fold_tree(variables["params"], variables.get("batch_stats", {}), epsilon, ())
    params, stats = _merge_tree(params, stats, epsilon, ())
    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = params
    if stats:
        out["batch_stats"] = stats
    return out
