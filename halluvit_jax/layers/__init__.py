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
    BatchNorm,
    DropPath,
    LayerNorm,
    PreNorm,
    batch_norm_train,
    dense_act_dense,
    drop_path_rates,
    gelu_exact,
    get_activation,
    layer_norm,
    materialize,
    norm_dense,
    softmax,
)
from halluvit_jax.layers.conv import depthwise_conv, grouped_conv
from halluvit_jax.layers.mlp import (
    CompactMlp,
    DepthwiseConv3x3,
    Mlp,
    RepDense,
    compact_width,
    rep_dense_bn,
)

__all__ = [
    "HAL_VARIANTS",
    "Attention",
    "BatchNorm",
    "CompactMlp",
    "DepthwiseConv3x3",
    "DropPath",
    "HalAttention",
    "LayerNorm",
    "Mlp",
    "PreNorm",
    "RepDense",
    "batch_norm_train",
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
    "materialize",
    "norm_dense",
    "rep_dense_bn",
    "scaled_logits",
    "softmax",
]
