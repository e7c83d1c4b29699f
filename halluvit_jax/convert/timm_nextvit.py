"""timm / original (bytedance) Next-ViT state_dict -> `halluvit_jax.models.nextvit` variables.

Layouts:
- timm: `stem.{i}`, `stages.{s}.blocks.{b}`, `mlp.fc1/fc2`, `head.fc`.
- original `classification/nextvit.py`: a flat `features.{k}` block list, `mlp.conv1/conv2` and
  `proj_head.0`. timm's `checkpoint_filter_fn` maps these by position (it zips both key orders);
  we map them by name instead, which is the same map because both models register their modules
  in the same order: `features.{k}` is block `k` counted over the stage depths (stage `s`, block
  `k` minus the blocks of earlier stages), `mlp.conv1/2` -> `mlp.fc1/2`, `proj_head.0` ->
  `head.fc`. The depths are read from the checkpoint itself (`infer_original_depths`: where its
  transformer blocks and its first downsampling patch-embed sit), so reduced or unusual variants
  work without being told. Names do not depend on the key order of the file, and a wrong name is
  reported instead of silently shifting every later tensor.

Tensors: BatchNorm weight/bias -> `params` scale/bias, running_mean/var -> `batch_stats`
mean/var (`num_batches_tracked` dropped); 3x3 convs `[O, I/g, 3, 3]` -> `[3, 3, I/g, O]`; 1x1
convs (our `nn.Dense`) `W[:, :, 0, 0].T`; Linear `W.T`. E-MHSA's separate q, k, v Linears become
our `q` + fused `kv` (`[k | v]`) when keys are pooled (sr > 1), else one fused `qkv` (`[q | k | v]`).
BN-fused checkpoints (after timm's `reparameterize()`, no pre-norms) are not supported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from halluvit_jax.convert.state_dict import (
    ConversionError,
    TrackedStateDict,
    check_variables,
    conv2d,
    linear,
    set_path,
)
from halluvit_jax.models import create_model

_BN_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
# Module paths (timm names, relative to a block) that are BatchNorms, and their Flax names.
_BLOCK_BNS = {
    "norm": "norm",
    "norm1": "norm1",
    "norm2": "norm2",
    "e_mhsa.norm": "sr_norm",
    "patch_embed.norm": "patch_embed/norm",
    "projection.norm": "projection/norm",
    "mhca.norm": "mhca/norm",
}
# 1x1 convs (Dense in Flax): timm name -> Flax path, whether it has a bias.
_BLOCK_1X1 = {
    "patch_embed.conv": "patch_embed/conv",
    "projection.conv": "projection/conv",
    "mhca.projection": "mhca/projection",
    "mlp.fc1": "mlp/fc1",
    "mlp.fc2": "mlp/fc2",
}


def _dense_1x1(weight: np.ndarray) -> np.ndarray:
    """1x1 `Conv2d.weight` `[O, I, 1, 1]` -> Dense kernel `[I, O]`."""
    w = np.asarray(weight)
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        raise ConversionError(f"Expected a 1x1 conv weight [O, I, 1, 1], got shape {w.shape}.")
    return np.ascontiguousarray(w[:, :, 0, 0].T)


def _is_original_layout(keys) -> bool:
    return any(k.startswith(("features.", "proj_head.")) for k in keys)


def _ntb_starts(depths) -> tuple[int, list[int]]:
    """(number of blocks, global indices of the NTBs) of the timm layout for `depths`."""
    d = list(depths)
    first = d[0] + d[1] - 1
    stage2 = [d[0] + d[1] + 5 * i + 4 for i in range(d[2] // 5)]
    return sum(d), [first] + stage2 + [sum(d) - 1]


def _original_blocks(keys) -> tuple[dict[int, set[str]], int, list[int]]:
    """{block: its key suffixes}, the block count and the NTB indices of a `features.{k}` file."""
    blocks: dict[int, set[str]] = {}
    for key in keys:
        m = re.match(r"^features\.(\d+)\.(.*)$", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
    n = max(blocks, default=-1) + 1
    return blocks, n, [k for k in range(n) if "e_mhsa.q.weight" in blocks.get(k, ())]


def infer_original_depths(keys) -> tuple[int, int, int, int]:
    """Stage depths of an original `features.{k}` checkpoint, read from its block structure.

    NTBs (blocks with `e_mhsa` keys) end stages 1, 2 (every 5th block) and 3; stage 1 starts at
    the first block after block 0 that has a `patch_embed.conv` (its stride-2 downsampling).
    """
    blocks, n, ntbs = _original_blocks(keys)
    if n == 0 or len(ntbs) < 3 or ntbs[-1] != n - 1:
        raise ConversionError(
            f"Cannot read the stage layout of this original Next-ViT checkpoint ({n} blocks, "
            f"transformer blocks at {ntbs}); is it a Next-ViT state_dict?"
        )
    d2 = 5 * (len(ntbs) - 2)
    downsampled = [k for k in range(1, ntbs[0] + 1) if "patch_embed.conv.weight" in blocks.get(k, ())]
    d0 = downsampled[0] if downsampled else ntbs[0]
    depths = (d0, ntbs[0] + 1 - d0, d2, n - (ntbs[0] + 1 + d2))
    if min(depths) < 1 or _ntb_starts(depths) != (n, ntbs):
        raise ConversionError(
            f"The transformer blocks of this original Next-ViT checkpoint (at {ntbs} of {n}) do "
            "not follow the Next-ViT stage layout; is it a Next-ViT state_dict?"
        )
    return depths


class _RenamedStateDict(Mapping):
    """timm-named view of an original state_dict; reads go through to the source (and its tracking)."""

    def __init__(self, source: Mapping[str, Any], names: dict[str, str]):
        self._source, self._names = source, names

    def __getitem__(self, key: str) -> Any:
        return self._source[self._names[key]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._names


def original_to_timm_keys(state_dict: Mapping[str, Any], depths=None) -> Mapping[str, Any]:
    """A timm-named view of an original bytedance Next-ViT state_dict (see module docstring).

    `depths` defaults to the layout read from the checkpoint (`infer_original_depths`).
    """
    if depths is None:
        depths = infer_original_depths(state_dict)
    depths = tuple(depths)
    _, found_n, found_ntbs = _original_blocks(state_dict)
    n, ntbs = _ntb_starts(depths)
    if (found_n, found_ntbs) != (n, ntbs):
        raise ConversionError(
            f"The checkpoint has {found_n} blocks with transformer blocks at {found_ntbs}, but "
            f"depths {depths} give {n} blocks with transformer blocks at {ntbs}; pass the depths "
            "the checkpoint was trained with (or none, to read them from the checkpoint)."
        )
    starts = np.cumsum([0] + list(depths))
    names: dict[str, str] = {}
    for key in state_dict:
        new = key
        m = re.match(r"^features\.(\d+)\.(.*)$", key)
        if m:
            k = int(m.group(1))
            if k >= n:
                raise ConversionError(
                    f"Original checkpoint key {key!r} is block {k}, but depths {depths} have {n} "
                    "blocks; pick the model variant the checkpoint was trained as."
                )
            s = int(np.searchsorted(starts, k, side="right") - 1)
            new = f"stages.{s}.blocks.{k - starts[s]}.{m.group(2)}"
        new = re.sub(r"\.mlp\.conv([12])\.", r".mlp.fc\1.", new)
        new = re.sub(r"^proj_head\.0\.", "head.fc.", new)
        names[new] = key
    return _RenamedStateDict(state_dict, names)


def _convert_block(sd: Mapping[str, Any], prefix: str, path: str, variables: dict) -> None:
    """Every tensor of block `prefix` (timm name, with trailing dot) into `variables` at `path`."""
    for module, flax_name in _BLOCK_BNS.items():
        for leaf, (collection, flax_leaf) in _BN_LEAVES.items():
            key = f"{prefix}{module}.{leaf}"
            if key in sd:
                set_path(variables, f"{collection}/{path}/{flax_name}/{flax_leaf}", sd[key])
    for module, flax_name in _BLOCK_1X1.items():
        if f"{prefix}{module}.weight" in sd:
            set_path(variables, f"params/{path}/{flax_name}/kernel", _dense_1x1(sd[f"{prefix}{module}.weight"]))
        if f"{prefix}{module}.bias" in sd:
            set_path(variables, f"params/{path}/{flax_name}/bias", np.asarray(sd[f"{prefix}{module}.bias"]))
    key = f"{prefix}mhca.group_conv3x3.weight"
    if key in sd:
        set_path(variables, f"params/{path}/mhca/group_conv3x3/kernel", conv2d(sd[key]))

    attn = f"{prefix}e_mhsa."
    if f"{attn}q.weight" not in sd:
        return
    parts = {n: (linear(sd[f"{attn}{n}.weight"]), np.asarray(sd[f"{attn}{n}.bias"])) for n in "qkv"}
    pooled = f"{attn}norm.weight" in sd  # sr > 1: keys/values come from the pooled tokens
    groups = {"q": "q", "kv": "kv"} if pooled else {"qkv": "qkv"}
    for name in groups:
        kernel = np.concatenate([parts[n][0] for n in name], axis=1)
        bias = np.concatenate([parts[n][1] for n in name], axis=0)
        set_path(variables, f"params/{path}/e_mhsa/{name}/kernel", kernel)
        set_path(variables, f"params/{path}/e_mhsa/{name}/bias", bias)
    set_path(variables, f"params/{path}/e_mhsa/proj/kernel", linear(sd[f"{attn}proj.weight"]))
    set_path(variables, f"params/{path}/e_mhsa/proj/bias", np.asarray(sd[f"{attn}proj.bias"]))


def convert(state_dict: Mapping[str, Any], model_name: str, depths=None) -> dict[str, Any]:
    """Map a timm or original Next-ViT state_dict to `{'params', 'batch_stats'}` (no shape check).

    The pure key mapping that `halluvit_jax.convert.from_timm` dispatches to; values are read
    only for the keys used, so a `TrackedStateDict` reports the rest. Every Next-ViT size shares
    the layout (`model_name` is unused); `depths` is only needed for original checkpoints whose
    stage layout cannot be read from the blocks. Use `convert_checked` (or `from_timm`) to also
    check the result against a model.
    """
    del model_name
    sd: Mapping[str, Any] = state_dict
    if _is_original_layout(sd):
        sd = original_to_timm_keys(sd, depths)
    block_key = re.compile(r"^stages\.\d+\.blocks\.\d+\.")
    pre_norm = re.compile(r"^stages\.\d+\.blocks\.\d+\.norm[12]?\.weight$")
    if any(block_key.match(k) for k in sd) and not any(pre_norm.match(k) for k in sd):
        raise ConversionError(
            "Checkpoint has no block pre-norms: it looks BN-fused (timm reparameterize() / "
            "original merge_bn()); convert the unfused checkpoint instead."
        )
    variables: dict[str, Any] = {}
    for i in range(4):
        if f"stem.{i}.conv.weight" in sd:
            set_path(variables, f"params/stem_{i}/conv/kernel", conv2d(sd[f"stem.{i}.conv.weight"]))
        for leaf, (collection, flax_leaf) in _BN_LEAVES.items():
            if f"stem.{i}.norm.{leaf}" in sd:
                set_path(variables, f"{collection}/stem_{i}/norm/{flax_leaf}", sd[f"stem.{i}.norm.{leaf}"])
    blocks = sorted({m.groups() for k in sd if (m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", k))})
    for s, b in blocks:
        _convert_block(sd, f"stages.{s}.blocks.{b}.", f"stages_{s}/blocks_{b}", variables)
    for leaf, (collection, flax_leaf) in _BN_LEAVES.items():
        if f"norm.{leaf}" in sd:
            set_path(variables, f"{collection}/norm/{flax_leaf}", sd[f"norm.{leaf}"])
    if "head.fc.weight" in sd:
        set_path(variables, "params/head/kernel", linear(sd["head.fc.weight"]))
    if "head.fc.bias" in sd:
        set_path(variables, "params/head/bias", np.asarray(sd["head.fc.bias"]))
    return {c: variables[c] for c in ("params", "batch_stats") if c in variables}


def convert_checked(state_dict: Mapping[str, Any], model_name: str, **overrides: Any) -> dict[str, Any]:
    """`convert`, then check against `create_model(model_name, **overrides)`.

    `num_classes` is taken from the checkpoint's head unless given (0 for headless ones). Raises
    one `ConversionError` listing every missing, unexpected, misshaped and unused entry.
    """
    if model_name.endswith("_hal"):
        raise ConversionError(
            f"{model_name!r} has no timm counterpart (hMHSA/cFFN change the weights' shapes); "
            "convert into the baseline model name, e.g. 'nextvit_small'."
        )
    sd = state_dict if isinstance(state_dict, TrackedStateDict) else TrackedStateDict(state_dict)
    head_key = "proj_head.0.weight" if _is_original_layout(sd) else "head.fc.weight"
    if "num_classes" not in overrides:
        overrides["num_classes"] = int(np.shape(sd[head_key])[0]) if head_key in sd else 0
    model = create_model(model_name, **overrides)
    variables = convert(sd, model_name, depths=overrides.get("depths"))
    return check_variables(variables, model, (1, 224, 224, model.in_chans), unused_keys=sd.unused())
