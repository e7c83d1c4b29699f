"""The one place a block turns a `HalConfig` into its attention and FFN layers."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from halluvit_jax.layers.attention import Attention, HalAttention
from halluvit_jax.layers.config import HalConfig
from halluvit_jax.layers.mlp import CompactMlp, Mlp


def make_attention(hal: HalConfig | None, dim: int, num_heads: int, *, name: str,
                   **kwargs: Any) -> nn.Module:
    """`HalAttention` for a hal model, else `Attention`; ``kwargs``: the common fields
    (``attn_drop``, ``proj_drop``, ``qkv_bias``, ``impl``, ``dtype``, ``param_dtype``)."""
    if hal is None:
        return Attention(dim, num_heads, name=name, **kwargs)
    return HalAttention(dim, num_heads, variant=hal.variant, hal_init=hal.hal_init, name=name,
                        **kwargs)


def make_mlp(hal: HalConfig | None, hidden: int, *, name: str, bn_momentum: float = 0.9,
             bn_epsilon: float = 1e-5, **kwargs: Any) -> nn.Module:
    """`CompactMlp` for a hal model with ``hal.cffn``, else `Mlp`; ``kwargs``: the common fields
    (``act``, ``use_dwconv``, ``drop``, ``impl``, ``dtype``, ``param_dtype``). The BatchNorm
    settings apply to the cFFN's training branches."""
    if hal is None or not hal.cffn:
        return Mlp(hidden, name=name, **kwargs)
    return CompactMlp(
        hidden, compact_ratio=hal.compact_ratio, round_to=hal.round_to,
        num_branches=hal.num_branches, factorize=hal.factorize, deploy=hal.deploy,
        bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, name=name, **kwargs,
    )
