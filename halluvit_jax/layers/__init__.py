"""Flax Linen layers: attention (plain and hallucinated), FFNs (plain and compact), helpers."""

from halluvit_jax.layers.attention import (
    HAL_VARIANTS,
    Attention,
    HalAttention,
    cross_head_hallucination,
    hal_logits,
    intra_head_hallucination,
)
from halluvit_jax.layers.attention_core import dot_product_attention, scaled_logits
from halluvit_jax.layers.common import (
    DropPath,
    LayerNorm,
    dense_act_dense,
    drop_path_rates,
    gelu_exact,
    get_activation,
    layer_norm,
    softmax,
)
from halluvit_jax.layers.conv import depthwise_conv, grouped_conv
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
    "dense_act_dense",
    "depthwise_conv",
    "dot_product_attention",
    "drop_path_rates",
    "gelu_exact",
    "get_activation",
    "grouped_conv",
    "hal_logits",
    "intra_head_hallucination",
    "layer_norm",
    "scaled_logits",
    "softmax",
]
