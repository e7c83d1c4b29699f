"""timm / original (whai362/PVT) PVTv2 state_dict -> `halluvit_jax.models.pvt_v2` variables.

Original key names are first renamed as timm's `checkpoint_filter_fn` does (`patch_embed1` ->
`patch_embed`, `patch_embedN` -> `stages.N-1.downsample`, `blockI.J` -> `stages.I-1.blocks.J`,
`normI` -> `stages.I-1.norm`, `dwconv.dwconv` -> `dwconv`). Blocks without spatial reduction
(sr=1, the last stage) get timm's separate `q` and `kv` projections concatenated into our
fused `qkv` (output order q | k | v, as our `Attention` splits it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from halluvit_jax.convert.state_dict import conv2d, linear, set_path

_ident: Callable[[np.ndarray], np.ndarray] = np.asarray
_BLOCK = r"^stages\.(\d+)\.blocks\.(\d+)\."

_RULES: list[tuple[re.Pattern, str, Callable[[np.ndarray], np.ndarray]]] = [
    (re.compile(r"^patch_embed\.proj\.weight$"), "patch_embed/proj/kernel", conv2d),
    (re.compile(r"^patch_embed\.proj\.bias$"), "patch_embed/proj/bias", _ident),
    (re.compile(r"^patch_embed\.norm\.weight$"), "patch_embed/norm/scale", _ident),
    (re.compile(r"^patch_embed\.norm\.bias$"), "patch_embed/norm/bias", _ident),
    (re.compile(r"^stages\.(\d+)\.downsample\.proj\.weight$"), "stages_{0}/downsample/proj/kernel", conv2d),
    (re.compile(r"^stages\.(\d+)\.downsample\.proj\.bias$"), "stages_{0}/downsample/proj/bias", _ident),
    (re.compile(r"^stages\.(\d+)\.downsample\.norm\.weight$"), "stages_{0}/downsample/norm/scale", _ident),
    (re.compile(r"^stages\.(\d+)\.downsample\.norm\.bias$"), "stages_{0}/downsample/norm/bias", _ident),
    (re.compile(_BLOCK + r"(norm[12])\.weight$"), "stages_{0}/blocks_{1}/{2}/scale", _ident),
    (re.compile(_BLOCK + r"(norm[12])\.bias$"), "stages_{0}/blocks_{1}/{2}/bias", _ident),
    (re.compile(_BLOCK + r"(attn\.(?:q|kv|proj)|mlp\.fc[12])\.weight$"), "stages_{0}/blocks_{1}/{2}/kernel", linear),
    (re.compile(_BLOCK + r"(attn\.(?:q|kv|proj)|mlp\.fc[12])\.bias$"), "stages_{0}/blocks_{1}/{2}/bias", _ident),
    (re.compile(_BLOCK + r"attn\.sr\.weight$"), "stages_{0}/blocks_{1}/sr/kernel", conv2d),
    (re.compile(_BLOCK + r"attn\.sr\.bias$"), "stages_{0}/blocks_{1}/sr/bias", _ident),
    (re.compile(_BLOCK + r"attn\.norm\.weight$"), "stages_{0}/blocks_{1}/sr_norm/scale", _ident),
    (re.compile(_BLOCK + r"attn\.norm\.bias$"), "stages_{0}/blocks_{1}/sr_norm/bias", _ident),
    (re.compile(_BLOCK + r"mlp\.dwconv\.weight$"), "stages_{0}/blocks_{1}/mlp/dwconv/conv/kernel", conv2d),
    (re.compile(_BLOCK + r"mlp\.dwconv\.bias$"), "stages_{0}/blocks_{1}/mlp/dwconv/conv/bias", _ident),
    (re.compile(r"^stages\.(\d+)\.norm\.weight$"), "stages_{0}/norm/scale", _ident),
    (re.compile(r"^stages\.(\d+)\.norm\.bias$"), "stages_{0}/norm/bias", _ident),
    (re.compile(r"^head\.weight$"), "head/kernel", linear),
    (re.compile(r"^head\.bias$"), "head/bias", _ident),
]


def timm_key(key: str) -> str:
    """Original PVTv2 key -> timm key (timm's `checkpoint_filter_fn`); timm keys are unchanged."""
    if key.startswith("patch_embed"):
        key = key.replace("patch_embed1", "patch_embed")
        for i in (2, 3, 4):
            key = key.replace(f"patch_embed{i}", f"stages.{i - 1}.downsample")
    key = key.replace("dwconv.dwconv", "dwconv")
    key = re.sub(r"block(\d+)\.(\d+)", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}", key)
    return re.sub(r"^norm(\d+)", lambda m: f"stages.{int(m.group(1)) - 1}.norm", key)


def _fuse_qkv(params: dict[str, Any]) -> None:
    """In blocks without an SR conv, merge `attn/q` and `attn/kv` into `attn/qkv`."""
    for name, stage in params.items():
        if not name.startswith("stages_"):
            continue
        for bname, block in stage.items():
            attn = block.get("attn", {}) if bname.startswith("blocks_") else {}
            if "sr" in block or "q" not in attn or "kv" not in attn:
                continue
            q, kv = attn.pop("q"), attn.pop("kv")
            attn["qkv"] = {
                k: np.concatenate([q[k], kv[k]], axis=-1) for k in q if k in kv
            }


def convert(state_dict: Mapping[str, np.ndarray], model_name: str) -> dict[str, Any]:
    """Map PVTv2 keys (timm or original names) to `{'params': ...}`; unmatched keys stay unread."""
    del model_name  # b0..b5 share the layout
    original = "patch_embed.proj.weight" not in state_dict
    params: dict[str, Any] = {}
    for key in state_dict:
        name = timm_key(key) if original else key
        for pattern, template, transform in _RULES:
            match = pattern.match(name)
            if match:
                groups = [g.replace(".", "/") for g in match.groups()]
                set_path(params, template.format(*groups), transform(state_dict[key]))
                break
    _fuse_qkv(params)
    return {"params": params}
