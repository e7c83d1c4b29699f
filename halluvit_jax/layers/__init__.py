"""Flax Linen layers: attention (plain and hallucinated), FFNs (plain and compact), helpers."""

from halluvit_jax.layers.attention import (
    HAL_VARIANTS,
    Attention,
    HalAttention,
    cross_head_hallucination,
    intra_head_hallucination,
)
from halluvit_jax.layers.common import (
    DropPath,
    LayerNorm,
    drop_path_rates,
    gelu_exact,
    get_activation,
    layer_norm,
    softmax,
)
from halluvit_jax.layers.mlp import CompactMlp, DepthwiseConv3x3, Mlp, RepDense, compact_width

__all__ = [
    "HAL_VARIANTS",
    "Attention",
    "CompactMlp",
    "DepthwiseConv3x3",
    "DropPath",
    "HalAttention",
    "LayerNorm",
    "Mlp",
    "RepDense",
    "compact_width",
    "cross_head_hallucination",
    "drop_path_rates",
    "gelu_exact",
    "get_activation",
    "intra_head_hallucination",
    "layer_norm",
    "softmax",
]
