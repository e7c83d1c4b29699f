"""Pretrained baseline -> hal model (hMHSA + cFFN) initialization, so fine-tuning replaces training.

    from halluvit_jax.convert.hal import baseline_to_hal
    hal_vars = baseline_to_hal(deit_s_vars, "deit_small", "deit_small_hal", calib_images=x)

What is mapped (docs/conversion.md has the derivations):

- Shared weights (patch embeddings, norms, position embeddings, fc1, heads, NextViT convs and
  BatchNorms, ...) are copied: every hal variable whose path and shape also exist in the
  baseline and that is not part of an attention or cFFN mapping.
- Attention (every module that sows `attn` maps): the `hr = h/2` real heads are the baseline
  heads whose calibration attention maps are least redundant (greedy on
  `analysis.similarity.head_similarity`: start from the head least similar to all others, then add the
  head whose largest similarity to the already kept ones is smallest). q'/k' of a real head are
  the baseline head's q/k when head dims agree, else the best rank-`d'` approximation of the
  head's bilinear logit form `[Wq; bq][Wk; bk]^T` (re-grouping, e.g. DeiT-T 3x64 -> 4x48).
- Hallucinated heads: IHH starts as the identity (centre tap 1, bias 0). Each hallucinated slot
  is given a dropped head (best least-squares fit first, then kept heads again once the dropped
  ones are used up); its CHH column is the least-squares fit of that head's row-centred logits
  from the real heads' row-centred logits on the calibration images (row-centred logits are
  `log A` minus its row mean, so only the sown attention maps are needed). Without CHH (variants
  `copy`, `ihh`) a hallucinated slot copies real slot j.
- v / proj follow the slots: a baseline head's `Wv_i Wproj_i` is copied when it has one slot of
  its own head dim, else split by SVD over its slots; v biases fold into the proj bias (softmax
  rows sum to 1, so `A (x Wv + bv) Wp = A x Wv Wp + bv Wp`).
- cFFN (`factorize='w2'`, or `'w1'`): the factors are the rank-c' truncated SVD of W2 (W1),
  `A = U_c sqrt(S_c)`, `B = sqrt(S_c) V_c^T` (Eckart-Young: the best rank-c' approximation).
  Branch r of a factor gets `K/r + E_r` (`E_r` small zero-sum noise so branches differ), and
  its BatchNorm statistics are the calibration mean/variance of that branch with scale
  `sqrt(var + eps)` and bias `mean (+ b/r)`, so in eval mode (and after `reparameterize`) each
  factor is exactly `x K + b`; in train mode BN uses batch statistics, which match this only
  as far as a batch resembles the calibration images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from halluvit_jax.cli import load_config
from halluvit_jax.convert.state_dict import (
    ConversionError,
    check_variables,
    flatten,
    unflatten,
)
from halluvit_jax.data import demo, pipeline
from halluvit_jax.analysis.similarity import head_similarity
from halluvit_jax.models import create_model, get_input_config

BN_EPS = 1e-5  # the cFFN BatchNorm epsilon (layers/mlp.py RepDense.bn_epsilon)
LOG_FLOOR = 1e-30  # attention probabilities are floored before the log (underflowed keys)


@dataclasses.dataclass
class HeadPlan:
    """How one attention module was mapped: baseline head per hal slot, CHH fit quality."""

    path: str
    baseline_heads: int
    hal_heads: int
    kept: list[int]
    slots: list[int]  # baseline head feeding each hal slot (real slots first)
    chh_r2: list[float]  # per hallucinated slot: R^2 of its least-squares fit (1.0 for copies)


# --------------------------------------------------------------------------------------------
# Pure building blocks (unit-tested against numpy references).


def _blas_single_thread():
    """Single-threaded BLAS for the host linear algebra: a multi-threaded OpenBLAS next to XLA's
    threads on a busy CPU makes a 1536x384 SVD 20x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def truncated_svd_factors(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """`(A, B)` with `A @ B` the best rank-`rank` approximation of `w` (Eckart-Young).

    `A = U_r sqrt(S_r)` `[n_in, rank]`, `B = sqrt(S_r) V_r^T` `[rank, n_out]`, computed in
    float64; columns beyond the matrix rank are zero.
    """
    w = np.asarray(w, np.float64)
    with _blas_single_thread():
        u, s, vt = np.linalg.svd(w, full_matrices=False)
    k = min(rank, s.shape[0])
    root = np.sqrt(s[:k])
    a = np.zeros((w.shape[0], rank))
    b = np.zeros((rank, w.shape[1]))
    a[:, :k] = u[:, :k] * root
    b[:k] = root[:, None] * vt[:k]
    return a, b


def select_heads(similarity: np.ndarray, num_keep: int) -> list[int]:
    """Greedy choice of the `num_keep` least redundant heads from a `[h, h]` similarity matrix.

    First the head with the smallest mean similarity to the others, then repeatedly the head
    whose largest similarity to the heads already chosen is smallest (ties: lower index).
    With `num_keep >= h` all heads are returned, cycling to fill `num_keep`.
    """
    s = np.asarray(similarity, np.float64)
    h = s.shape[0]
    if num_keep >= h:
        return [i % h for i in range(num_keep)]
    off = s.copy()
    np.fill_diagonal(off, np.nan)
    mean_sim = np.nan_to_num(np.nanmean(off, axis=1), nan=0.0) if h > 1 else np.zeros(1)
    kept = [int(np.argmin(mean_sim))]
    while len(kept) < num_keep:
        rest = [i for i in range(h) if i not in kept]
        worst = [max(s[i, j] for j in kept) for i in rest]
        kept.append(rest[int(np.argmin(worst))])
    return kept


def centred_log_attention(attn: np.ndarray) -> np.ndarray:
    """Row-centred logits recovered from softmaxed maps: `log A - mean_keys(log A)`, `[B,h,N,Nk]`."""
    log_a = np.log(np.maximum(np.asarray(attn, np.float64), LOG_FLOOR))
    return log_a - log_a.mean(axis=-1, keepdims=True)


def least_squares_mix(real: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights `w` `[hr]` minimizing `||sum_i w_i real_i - target||^2`, and the fit's R^2.

    `real` `[B, hr, N, Nk]`, `target` `[B, N, Nk]` (row-centred logits).
    """
    x = np.moveaxis(np.asarray(real, np.float64), 1, -1).reshape(-1, real.shape[1])
    y = np.asarray(target, np.float64).reshape(-1)
    with _blas_single_thread():
        w, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ w
    denom = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / denom if denom > 0 else 1.0
    return w, r2


def bilinear_factors(q_aug: np.ndarray, k_aug: np.ndarray, rank: int, scale: float = 1.0):
    """Best rank-`rank` `(Q', K')` with `Q' K'^T ~= scale * q_aug k_aug^T` (factors split evenly)."""
    m = scale * np.asarray(q_aug, np.float64) @ np.asarray(k_aug, np.float64).T
    a, b = truncated_svd_factors(m, rank)
    return a, b.T


def rep_dense_init(
    kernel: np.ndarray,
    bias: np.ndarray | None,
    num_branches: int,
    inputs: np.ndarray | None,
    *,
    noise: float = 0.02,
    rng: np.random.Generator | None = None,
    epsilon: float = BN_EPS,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Training-form RepDense `(params, batch_stats)` whose eval output is exactly `x @ kernel + bias`.

    Branch kernels `kernel / r + E_r` (`E_r` normal(noise), zero-sum over branches). BatchNorm
    statistics are each branch's mean/variance on `inputs` `[M, in]` (mean 0, var 1 without
    inputs); scale `sqrt(var + eps)` and bias `mean + bias / r` undo the normalization.
    """
    kernel = np.asarray(kernel, np.float64)
    n_in, n_out = kernel.shape
    r = num_branches
    rng = rng or np.random.default_rng(0)
    e = rng.normal(0.0, noise, (r, n_in, n_out)) if (r > 1 and noise > 0) else np.zeros((r, n_in, n_out))
    e -= e.mean(axis=0, keepdims=True)
    branch = kernel[None] / r + e
    if inputs is not None:
        z = np.einsum("mi,rio->mro", np.asarray(inputs, np.float64), branch)
        mean, var = z.mean(axis=0), z.var(axis=0)
    else:
        mean, var = np.zeros((r, n_out)), np.ones((r, n_out))
    b = np.zeros(n_out) if bias is None else np.asarray(bias, np.float64)
    params = {
        "branch_kernel": branch.astype(np.float32),
        "bn": {"scale": np.sqrt(var + epsilon).astype(np.float32),
               "bias": (mean + b[None] / r).astype(np.float32)},
    }
    stats = {"bn": {"mean": mean.astype(np.float32), "var": var.astype(np.float32)}}
    return params, stats


# --------------------------------------------------------------------------------------------
# Model introspection.


def _input_size(model: Any, name: str) -> int:
    return getattr(model, "img_size", None) or get_input_config(name).input_size


def _run_baseline(model, variables, images):
    """Logits, sown attention maps `{module_path: [B,h,N,Nk]}` and fc1/fc2 inputs of the baseline."""
    captured: dict[str, np.ndarray] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, nn.Dense) and mod.name in ("fc1", "fc2"):
            captured["/".join(mod.scope.path)] = args[0]
        return next_fun(*args, **kwargs)

    def fwd(v, x):
        with nn.intercept_methods(interceptor):
            logits, state = model.apply(v, x, mutable=["intermediates"])
        return logits, state["intermediates"], dict(captured)

    logits, inter, inputs = jax.jit(fwd)(variables, images)
    attn = {p.rsplit("/", 1)[0]: np.asarray(v[0] if isinstance(v, tuple) else v)
            for p, v in flatten(jax.device_get(inter)).items() if p.endswith("/attn")}
    inputs = {p: np.asarray(v) for p, v in jax.device_get(inputs).items()}
    return np.asarray(logits), attn, inputs


def _sown_heads(model, variables_shape, input_shape) -> dict[str, int]:
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables_shape, x)
    out = {}
    for p, v in flatten(state["intermediates"]).items():
        if p.endswith("/attn"):
            out[p.rsplit("/", 1)[0]] = int((v[0] if isinstance(v, tuple) else v).shape[1])
    return out


def _node(tree: Mapping[str, Any], path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


# --------------------------------------------------------------------------------------------
# Attention mapping.


def _baseline_heads(node: Mapping[str, Any], h: int):
    """Per-head q, k, v kernels `[h, C, d]`, biases `[h, d]`, proj rows `[h, d, C]` and proj bias."""
    c = np.asarray(node["proj"]["kernel"]).shape[0]
    d = c // h
    if "qkv" in node:
        w = np.asarray(node["qkv"]["kernel"], np.float64).reshape(-1, 3, h, d)
        b = np.asarray(node["qkv"]["bias"], np.float64).reshape(3, h, d)
        wq, wk, wv = (w[:, i].transpose(1, 0, 2) for i in range(3))
        bq, bk, bv = b
    else:
        wq = np.asarray(node["q"]["kernel"], np.float64).reshape(-1, h, d).transpose(1, 0, 2)
        bq = np.asarray(node["q"]["bias"], np.float64).reshape(h, d)
        wkv = np.asarray(node["kv"]["kernel"], np.float64).reshape(-1, 2, h, d)
        bkv = np.asarray(node["kv"]["bias"], np.float64).reshape(2, h, d)
        wk, wv = wkv[:, 0].transpose(1, 0, 2), wkv[:, 1].transpose(1, 0, 2)
        bk, bv = bkv
    wp = np.asarray(node["proj"]["kernel"], np.float64).reshape(h, d, -1)
    bp = np.asarray(node["proj"]["bias"], np.float64)
    return wq, bq, wk, bk, wv, bv, wp, bp


def hal_attention_from_attention(
    base_node: Mapping[str, Any], hal_node: Mapping[str, Any], attn: np.ndarray, num_heads: int,
    path: str = "",
) -> tuple[dict[str, Any], HeadPlan]:
    """HalAttention params (`num_heads` heads, shapes of `hal_node`) from an Attention's params.

    `attn` `[B, h, N, Nk]`: the baseline's softmaxed maps on calibration images. Returns the
    params and the `HeadPlan` (kept heads, baseline head per slot, CHH fit R^2).
    """
    h_hal = num_heads
    attn = np.asarray(attn)
    h_b = attn.shape[1]
    wq, bq, wk, bk, wv, bv, wp, bp = _baseline_heads(base_node, h_b)
    c, d_b = wq.shape[1], wq.shape[2]
    hr = hh = h_hal // 2
    d_h = c // h_hal
    kept = select_heads(head_similarity(attn), hr)
    has_chh = "chh_kernel" in hal_node

    # Hallucinated slots: dropped heads (best least-squares fit first), then kept ones again.
    logits = centred_log_attention(attn)
    real = logits[:, kept]
    chh = np.zeros((hr, hh))
    hal_heads, r2s = [], []
    if has_chh:
        dropped = [i for i in range(h_b) if i not in kept]
        fits = {i: least_squares_mix(real, logits[:, i]) for i in dropped}
        order = sorted(dropped, key=lambda i: -fits[i][1])
        for j in range(hh):
            if j < len(order):
                i = order[j]
                chh[:, j], r2 = fits[i]
            else:
                slot = (j - len(order)) % hr
                i, r2 = kept[slot], 1.0
                chh[slot, j] = 1.0
            hal_heads.append(i)
            r2s.append(float(r2))
    else:
        hal_heads = [kept[j % hr] for j in range(hh)]
        r2s = [1.0] * hh
    slots = list(kept) + hal_heads

    # q', k' of the real slots.
    qp = np.zeros((c + 1, hr, d_h))
    kp = np.zeros((c + 1, hr, d_h))
    for j, i in enumerate(kept):
        q_aug = np.concatenate([wq[i], bq[i][None]], axis=0)
        k_aug = np.concatenate([wk[i], bk[i][None]], axis=0)
        if d_h == d_b:
            qp[:, j], kp[:, j] = q_aug, k_aug
        else:  # same logits q.k/sqrt(d): scale the bilinear form by sqrt(d_h / d_b)
            qp[:, j], kp[:, j] = bilinear_factors(q_aug, k_aug, d_h, np.sqrt(d_h / d_b))

    # v / proj per slot.
    vp = np.zeros((c, h_hal, d_h))
    bvp = np.zeros((h_hal, d_h))
    pp = np.zeros((h_hal, d_h, c))
    bproj = bp.copy()
    for i in range(h_b):
        mine = [j for j, s in enumerate(slots) if s == i]
        if d_h == d_b and len(mine) == 1:
            j = mine[0]
            vp[:, j], bvp[j], pp[j] = wv[i], bv[i], wp[i]
            continue
        bproj += bv[i] @ wp[i]  # rows of A sum to 1: the v bias is a constant output
        if not mine:
            continue
        a, b = truncated_svd_factors(wv[i] @ wp[i], d_h * len(mine))
        for n, j in enumerate(mine):
            vp[:, j] = a[:, n * d_h:(n + 1) * d_h]
            pp[j] = b[n * d_h:(n + 1) * d_h]

    out: dict[str, Any] = {}
    half = hr * d_h
    qk_w = [qp[:c].reshape(c, half), kp[:c].reshape(c, half)]
    qk_b = [qp[c].reshape(half), kp[c].reshape(half)]
    v_w, v_b = vp.reshape(c, c), bvp.reshape(c)
    if "qkv" in hal_node:
        out["qkv"] = {"kernel": np.concatenate(qk_w + [v_w], 1), "bias": np.concatenate(qk_b + [v_b])}
    else:
        out["q"] = {"kernel": qk_w[0], "bias": qk_b[0]}
        out["kv"] = {"kernel": np.concatenate([qk_w[1], v_w], 1), "bias": np.concatenate([qk_b[1], v_b])}
    out["proj"] = {"kernel": pp.reshape(c, c), "bias": bproj}
    if "ihh_kernel" in hal_node:
        k = np.zeros(np.shape(hal_node["ihh_kernel"]))
        k[:, k.shape[1] // 2, k.shape[2] // 2] = 1.0
        out["ihh_kernel"], out["ihh_bias"] = k, np.zeros(hr)
    if has_chh:
        out["chh_kernel"], out["chh_bias"] = chh, np.zeros(hh)
    return out, HeadPlan(path, h_b, h_hal, list(map(int, kept)), list(map(int, slots)), r2s)


# --------------------------------------------------------------------------------------------
# cFFN mapping.


def cffn_from_mlp(
    base_node: Mapping[str, Any], hal_node: Mapping[str, Any], inputs: np.ndarray | None = None,
    *, rng: np.random.Generator | None = None, noise: float = 0.02,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(params, batch_stats)` of a CompactMlp (shapes of `hal_node`) from an Mlp's params.

    `inputs`: calibration inputs of the factorized map (`fc2` for W2, `fc1` for W1) for the
    BatchNorm statistics. In eval mode the result computes `fc1 -> act -> x A B + b2` with
    `A B` the best rank-c' approximation of W2.
    """
    rng = rng or np.random.default_rng(0)
    if "fc2a" in hal_node:
        full, first, second, keep = "fc2", "fc2a", "fc2b", "fc1"
    else:
        full, first, second, keep = "fc1", "fc1a", "fc1b", "fc2"
    w = np.asarray(base_node[full]["kernel"], np.float64)
    b = np.asarray(base_node[full]["bias"], np.float64)
    r, _, width = np.shape(hal_node[first]["branch_kernel"])
    a, bb = truncated_svd_factors(w, width)
    x = None if inputs is None else np.asarray(inputs, np.float64).reshape(-1, w.shape[0])
    p1, s1 = rep_dense_init(a, None, r, x, noise=noise, rng=rng)
    p2, s2 = rep_dense_init(bb, b, r, None if x is None else x @ a, noise=noise, rng=rng)
    params = {first: p1, second: p2, keep: dict(base_node[keep])}
    return params, {first: s1, second: s2}


# --------------------------------------------------------------------------------------------
# Public API.


def _split_overrides(baseline_overrides, hal_overrides):
    bo = dict(baseline_overrides or {})
    ho = dict(bo if hal_overrides is None else hal_overrides)
    return bo, ho


def hal_overrides_from_baseline(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The baseline's overrides that carry over to its hal model (odd head counts are dropped)."""
    out = {}
    for key, value in overrides.items():
        if key.startswith("num_heads"):
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(int(v) % 2 for v in values):
                continue
        if key in ("deploy", "hal"):  # the hal model keeps its own HalConfig
            continue
        out[key] = value
    return out


def synthetic_calibration_images(size: int, count: int = 8, seed: int = 0) -> np.ndarray:
    """Standard-normal NHWC images (normalized-input statistics) when no real images are given."""
    return np.random.default_rng(seed).normal(size=(count, size, size, 3)).astype(np.float32)


def convert_baseline_to_hal(
    variables: Mapping[str, Any],
    baseline_name: str,
    hal_name: str,
    calib_images: Any = None,
    *,
    baseline_overrides: Mapping[str, Any] | None = None,
    hal_overrides: Mapping[str, Any] | None = None,
    branch_noise: float = 0.02,
    seed: int = 0,
) -> tuple[dict[str, Any], list[HeadPlan]]:
    """`baseline_to_hal` that also returns the per-attention-module `HeadPlan`s."""
    bo, ho = _split_overrides(baseline_overrides, hal_overrides)
    if ho.get("deploy"):
        raise ConversionError("Convert into the training form (deploy=False); fold later with `convert deploy`.")
    base_model = create_model(baseline_name, **bo)
    hal_model = create_model(hal_name, **ho)
    fixed = {getattr(m, "img_size", None) for m in (base_model, hal_model)} - {None}
    if len(fixed) > 1:
        raise ConversionError(
            f"{baseline_name} and {hal_name} are built for different img_size {sorted(fixed)}; give both the same."
        )
    if calib_images is not None:
        images = np.asarray(calib_images, np.float32)
        size = images.shape[1] if images.ndim == 4 else -1
    else:
        size = fixed.pop() if fixed else _input_size(base_model, baseline_name)
        images = synthetic_calibration_images(size)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3 or (fixed and size not in fixed):
        want = f"{next(iter(fixed))}" if fixed else "S"
        raise ConversionError(f"Calibration images must be NHWC [B, {want}, {want}, 3], got {images.shape}.")
    shape = (1, size, size, 3)
    base_vars = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    base_vars = check_variables(base_vars, base_model, shape)  # wrong model -> ConversionError

    _, attn, mlp_inputs = _run_baseline(base_model, base_vars, jnp.asarray(images))

    # Shapes only (a jitted init of a full model compiles slowly): every hal variable is mapped
    # or copied below, none keeps an initializer value.
    hal_init = jax.eval_shape(lambda: hal_model.init(jax.random.key(seed), jnp.zeros(shape, jnp.float32)))
    hal_init = {k: v for k, v in hal_init.items() if k != "intermediates"}
    hal_heads = _sown_heads(hal_model, hal_init, shape)
    if set(hal_heads) != set(attn):
        raise ConversionError(
            f"{baseline_name} and {hal_name} have different attention modules "
            f"({sorted(set(attn) ^ set(hal_heads))[:4]}); convert a baseline into its own hal variant."
        )

    rng = np.random.default_rng(seed)
    new_params: dict[str, Any] = {}
    new_stats: dict[str, Any] = {}
    plans = []
    for path in sorted(attn):
        try:
            mapped, plan = hal_attention_from_attention(
                _node(base_vars["params"], path), _node(hal_init["params"], path),
                attn[path], hal_heads[path], path,
            )
        except (KeyError, ValueError) as err:
            raise ConversionError(f"Cannot map attention {path!r}: {err}.") from None
        plans.append(plan)
        new_params.update({f"{path}/{k}": v for k, v in flatten(mapped).items()})
    hal_flat = flatten(hal_init["params"])
    cffn_nodes = sorted({p.rsplit("/", 2)[0] for p in hal_flat if p.endswith("/branch_kernel")})
    for path in cffn_nodes:
        base_node = _node(base_vars["params"], path)
        full = "fc2" if "fc2a" in _node(hal_init["params"], path) else "fc1"
        params, stats = cffn_from_mlp(
            base_node, _node(hal_init["params"], path), mlp_inputs.get(f"{path}/{full}"),
            rng=rng, noise=branch_noise,
        )
        new_params.update({f"{path}/{k}": v for k, v in flatten(params).items()})
        new_stats.update({f"{path}/{k}": v for k, v in flatten(stats).items()})

    # Everything else is shared: copy by path.
    base_flat = flatten(base_vars)
    out: dict[str, Any] = {}
    problems = []
    for coll, mapped in (("params", new_params), ("batch_stats", new_stats)):
        for p, init in flatten(hal_init.get(coll, {})).items():
            full_path = f"{coll}/{p}"
            value = mapped.get(p)
            if value is None:
                value = base_flat.get(full_path)
            if value is None:
                problems.append(f"{full_path} (not in the baseline)")
                continue
            if tuple(np.shape(value)) != tuple(np.shape(init)):
                problems.append(f"{full_path} {tuple(np.shape(value))} vs {tuple(np.shape(init))}")
                continue
            out[full_path] = np.asarray(value, np.float32)
    if problems:
        raise ConversionError(
            f"{baseline_name} does not map onto {hal_name}: " + ", ".join(problems[:8])
            + (f", ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
            + ". Convert a baseline into its own hal variant with the same overrides."
        )
    expected = {p: (tuple(v.shape), v.dtype) for p, v in flatten(hal_init).items()}
    result = check_variables(unflatten(out), hal_model, shape, expected=expected)
    return result, plans


def baseline_to_hal(
    variables: Mapping[str, Any],
    baseline_name: str,
    hal_name: str,
    calib_images: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Initialize `hal_name` (training form) from the variables of its baseline `baseline_name`.

    `calib_images` `[B, H, W, 3]` (normalized like the model's input; a few dozen are plenty)
    drive the head choice, the CHH least squares and the cFFN BatchNorm statistics; without them
    standard-normal images are used. `baseline_overrides` / `hal_overrides` (keyword arguments)
    build reduced or resized models; the hal overrides default to the baseline's. Raises
    `ConversionError` when the variables do not fit the baseline or the baseline not the hal model.
    """
    return convert_baseline_to_hal(variables, baseline_name, hal_name, calib_images, **kwargs)[0]


def _agreement(la: np.ndarray, lb: np.ndarray) -> dict[str, float]:
    la, lb = np.asarray(la, np.float64), np.asarray(lb, np.float64)
    cos = np.sum(la * lb, -1) / np.maximum(np.linalg.norm(la, axis=-1) * np.linalg.norm(lb, axis=-1), 1e-12)
    return {"cosine": float(cos.mean()), "top1_agreement": float(np.mean(la.argmax(-1) == lb.argmax(-1)))}


def conversion_report(
    base_vars, baseline_name, hal_vars, hal_name, images, *, baseline_overrides=None,
    hal_overrides=None, seed: int = 0,
) -> dict[str, Any]:
    """Logit agreement with the baseline of the converted hal model and of a random-init one."""
    bo, ho = _split_overrides(baseline_overrides, hal_overrides)
    bm, hm = create_model(baseline_name, **bo), create_model(hal_name, **ho)
    images = jnp.asarray(images, jnp.float32)
    base = {k: v for k, v in base_vars.items() if k in ("params", "batch_stats")}
    random = hm.init(jax.random.key(seed + 1), images[:1])  # eager: a jitted init compiles slowly
    random = {k: v for k, v in random.items() if k != "intermediates"}
    hal_apply = jax.jit(hm.apply)
    base_logits = jax.jit(bm.apply)(base, images)
    return {
        "images": int(images.shape[0]),
        "converted": _agreement(base_logits, hal_apply(hal_vars, images)),
        "random_init": _agreement(base_logits, hal_apply(random, images)),
    }


def calibration_images_from_config(config: str, count: int = 64, split: str = "train") -> np.ndarray:
    """The first `count` images of `split` through the eval transforms of a training config.

    `config` is `path/to/config.py[:args]` (as `train.py --config`); the embedded demo dataset
    is prepared on first use when the config asks for it.
    """
    file, _, arg = config.partition(":")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"Calibration config {file!r} does not exist.")
    cfg = load_config(file, arg or None)
    input_cfg = cfg.input.copy_and_resolve_references()
    if cfg.get("prepare_demo", False):
        demo.prepare_demo(input_cfg.data_dir)
    input_cfg.eval_split = f"{split}[:{int(count)}]" if "[" not in split else split
    batches = []
    for batch in pipeline.create_eval_iter(input_cfg, global_batch_size=int(count)):
        batches.append(np.asarray(batch["image"])[np.asarray(batch["mask"], bool)])
    images = np.concatenate(batches)[:count]
    if not len(images):
        raise ValueError(f"No calibration images in split {split!r} of {file}.")
    return images.astype(np.float32)
