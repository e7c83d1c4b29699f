"""Flax Linen layers: attention (plain and hallucinated), FFNs (plain and compact), norms.

Each layer's forward pass is a plain function of its parameters (`mhsa`, `hmhsa`, `mlp`,
`cffn`, `rep_dense`, `layer_norm`, `batch_norm`): the paper's math with stock jax ops. The
modules create the parameters, naming their logical axes (`halluvit_jax.layers.axes`), and
`run` that function, or its CPU-tuned counterpart in `halluvit_jax.layers.fused`, as their
``impl`` field says (`halluvit_jax.layers.config`).
"""

from halluvit_jax.layers import axes, fused
from halluvit_jax.layers.attention import (
    Attention,
    HalAttention,
    cross_head_hallucination,
    hallucinate,
    hmhsa,
    intra_head_hallucination,
    mhsa,
)
from halluvit_jax.layers.common import (
    DenseParams,
    DropPath,
    PreNorm,
    dense,
    drop_path_rates,
    get_activation,
    timm_trunc_normal,
)
from halluvit_jax.layers.config import HAL_VARIANTS, IMPLS, HalConfig, run
from halluvit_jax.layers.factory import make_attention, make_mlp
from halluvit_jax.layers.mlp import (
    CompactMlp,
    DepthwiseConv3x3,
    Mlp,
    RepDense,
    cffn,
    compact_width,
    depthwise_conv3x3,
    mlp,
    rep_dense,
)
from halluvit_jax.layers.norm import BatchNorm, LayerNorm, batch_norm, layer_norm, materialize

__all__ = [
    "axes",
    "HAL_VARIANTS",
    "IMPLS",
    "Attention",
    "BatchNorm",
    "CompactMlp",
    "DenseParams",
    "DepthwiseConv3x3",
    "DropPath",
    "HalAttention",
    "HalConfig",
    "LayerNorm",
    "Mlp",
    "PreNorm",
    "RepDense",
    "batch_norm",
    "cffn",
    "compact_width",
    "cross_head_hallucination",
    "dense",
    "depthwise_conv3x3",
    "drop_path_rates",
    "fused",
    "get_activation",
    "hallucinate",
    "hmhsa",
    "intra_head_hallucination",
    "layer_norm",
    "make_attention",
    "make_mlp",
    "materialize",
    "mhsa",
    "mlp",
    "rep_dense",
    "run",
    "timm_trunc_normal",
]
