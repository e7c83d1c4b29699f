"""timm / original DeiT state_dict -> `halluvit_jax.models.deit` variables.

Both layouts use the same key names (the original wraps them under 'model', which
`unwrap_state_dict` removes). Linear weights are transposed, the patch conv goes to HWIO,
and `pos_embed` is resampled when the checkpoint was trained at another resolution.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from halluvit_jax.convert.state_dict import conv2d, linear, set_path
from halluvit_jax.models.deit import resample_pos_embed

_ident: Callable[[np.ndarray], np.ndarray] = np.asarray

# (regex on the timm key, Flax path template, transform)
_RULES: list[tuple[re.Pattern, str, Callable[[np.ndarray], np.ndarray]]] = [
    (re.compile(r"^cls_token$"), "cls_token", _ident),
    (re.compile(r"^pos_embed$"), "pos_embed", _ident),
    (re.compile(r"^patch_embed\.proj\.weight$"), "patch_embed/kernel", conv2d),
    (re.compile(r"^patch_embed\.proj\.bias$"), "patch_embed/bias", _ident),
    (re.compile(r"^blocks\.(\d+)\.(norm[12])\.weight$"), "blocks_{0}/{1}/scale", _ident),
    (re.compile(r"^blocks\.(\d+)\.(norm[12])\.bias$"), "blocks_{0}/{1}/bias", _ident),
    (re.compile(r"^blocks\.(\d+)\.(attn\.(?:qkv|proj)|mlp\.fc[12])\.weight$"), "blocks_{0}/{1}/kernel", linear),
    (re.compile(r"^blocks\.(\d+)\.(attn\.(?:qkv|proj)|mlp\.fc[12])\.bias$"), "blocks_{0}/{1}/bias", _ident),
    (re.compile(r"^norm\.weight$"), "norm/scale", _ident),
    (re.compile(r"^norm\.bias$"), "norm/bias", _ident),
    (re.compile(r"^head\.weight$"), "head/kernel", linear),
    (re.compile(r"^head\.bias$"), "head/bias", _ident),
]


def convert(state_dict: Mapping[str, np.ndarray], model_name: str) -> dict[str, Any]:
    """Map DeiT keys to `{'params': ...}`; keys matching no rule are left unread (reported)."""
    del model_name  # every DeiT size shares the layout
    params: dict[str, Any] = {}
    for key in state_dict:
        for pattern, template, transform in _RULES:
            match = pattern.match(key)
            if match:
                groups = [g.replace(".", "/") for g in match.groups()]
                set_path(params, template.format(*groups), transform(state_dict[key]))
                break
    return {"params": params}


def fit_to_model(variables: dict[str, Any], expected: Mapping[str, tuple]) -> dict[str, Any]:
    """Resample `pos_embed` to the model's patch grid when the checkpoint's grid differs.

    `expected` is `{'params/pos_embed': (shape, dtype), ...}` of the target model.
    """
    params = variables.get("params", {})
    target = expected.get("params/pos_embed")
    pos = params.get("pos_embed")
    if target is None or pos is None or tuple(pos.shape) == tuple(target[0]):
        return variables
    n_new = target[0][1] - 1
    side = round(float(np.sqrt(n_new)))
    if side * side != n_new or pos.shape[-1] != target[0][-1]:
        return variables  # leave the mismatch to check_variables
    try:
        params["pos_embed"] = resample_pos_embed(pos, (side, side), num_prefix_tokens=1)
    except ValueError:
        pass  # not a square grid: check_variables reports the shape mismatch
    return variables
