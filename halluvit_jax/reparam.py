"""Training form -> deploy form: fold the BatchNorms of every cFFN factor into one Dense.

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


def reparameterize(variables: Variables, *, epsilon: float = 1e-5) -> dict[str, Any]:
    """Return the deploy-form variables of a model holding cFFN modules in training form.

    Every `RepDense` (the factors of `CompactMlp`) anywhere in `variables['params']` has its r
    branches and BatchNorms folded into `{'kernel', 'bias'}` and its `batch_stats` removed; all
    other collections and leaves are returned unchanged (other BatchNorms, e.g. NextViT's, keep
    their statistics). The result is what `create_model(name, deploy=True).init` would create,
    so `model_deploy.apply(reparameterize(v), x)` equals `model_train.apply(v, x, train=False)`.
    `epsilon` must match the BatchNorm epsilon of the cFFN factors (1e-5 by default).
    Variables that hold no training-form cFFN come back unchanged (the fold is idempotent).
    """
    if "params" not in variables:
        raise ValueError("reparameterize() expects a variables dict with a 'params' collection.")
    params, stats = _fold_tree(variables["params"], variables.get("batch_stats", {}), epsilon, ())
    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = params
    if stats:
        out["batch_stats"] = stats
    return out
