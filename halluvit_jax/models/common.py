"""The plumbing every backbone shares: the fields of a classifier (`Backbone`), the settings it
passes down to its blocks (`BlockConfig`) and its classifier head (`ClassifierHead`).

A family is one file: a `Backbone` subclass with its own fields, ``forward_features`` and a
``head_pool``; its blocks take one ``cfg: BlockConfig`` and build their layers from it
(``cfg.attention``, ``cfg.mlp``, ``cfg.layer_norm``, ``cfg.batch_norm``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from halluvit_jax.layers import BatchNorm, HalConfig, LayerNorm, axes, make_attention, make_mlp
from halluvit_jax.layers.common import Dtype, dense, promote, timm_trunc_normal
from halluvit_jax.models.registry import remat_block


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What every block of a backbone shares (hashable, so it can be a module field).

    - ``hal``: the hMHSA + cFFN switches (None: the baseline); ``impl``: how layers compute
      (`halluvit_jax.layers.config`); ``dtype``/``param_dtype``: compute and parameter dtypes.
    - ``drop``: dropout on the FFN hidden layer and output and on the attention projection;
      ``attn_drop``: on the attention maps.
    - ``act``: the FFN activation; ``bn_momentum``/``bn_epsilon``: the cFFN's BatchNorms (and the
      backbone's own, for NextViT).
    - ``remat``: what the backward pass recomputes per block (`remat_block`).
    """

    hal: HalConfig | None = None
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    drop: float = 0.0
    attn_drop: float = 0.0
    act: str = "gelu"
    bn_momentum: float = 0.9  # PyTorch momentum 0.1
    bn_epsilon: float = 1e-5
    remat: str = "none"

    def _common(self) -> dict:
        return dict(impl=self.impl, dtype=self.dtype, param_dtype=self.param_dtype)

    def attention(self, dim: int, num_heads: int, name: str) -> nn.Module:
        """`Attention`, or `HalAttention` in a hal model."""
        return make_attention(self.hal, dim, num_heads, attn_drop=self.attn_drop,
                              proj_drop=self.drop, name=name, **self._common())

    def mlp(self, hidden: int, name: str = "mlp", **kwargs) -> nn.Module:
        """`Mlp`, or `CompactMlp` in a hal model with cFFNs; ``kwargs``: e.g. ``use_dwconv``."""
        return make_mlp(self.hal, hidden, act=self.act, drop=self.drop,
                        bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, name=name,
                        **kwargs, **self._common())

    def layer_norm(self, epsilon: float, name: str | None = None) -> LayerNorm:
        return LayerNorm(epsilon=epsilon, name=name, **self._common())

    def batch_norm(self, name: str | None = None) -> BatchNorm:
        """``nn.BatchNorm``'s variables and semantics (two-pass variance)."""
        return BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=name,
                         **self._common())

    def remat_block(self, block: type[nn.Module], static_argnums: tuple[int, ...] = (2,)):
        """``block`` rematerialized as ``remat`` says (`halluvit_jax.models.registry.remat_block`)."""
        return remat_block(block, self.remat, static_argnums)


class ClassifierHead(nn.Module):
    """Pool the features, dropout, then ``x @ kernel + bias`` (``nn.Dense``'s params ``kernel``
    ``[C, num_classes]`` and ``bias``, timm's init; none when ``num_classes`` is 0).

    ``pool``: ``"token"`` (the first token of ``[B, N, C]``: DeiT's class token) or ``"avg"``
    (the mean over the spatial axes of ``[B, H, W, C]``). ``pre_logits=True`` returns the
    pooled features.
    """

    num_classes: int
    pool: str
    drop_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool = False,
                 pre_logits: bool = False) -> jax.Array:
        x = features[:, 0] if self.pool == "token" else features.mean(axis=(1, 2))
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        if pre_logits or self.num_classes <= 0:
            return x
        shape = (x.shape[-1], self.num_classes)
        p = {"kernel": axes.param(self, "kernel", timm_trunc_normal, shape, self.param_dtype,
                                  ("embed", "classes")),
             "bias": axes.param(self, "bias", nn.initializers.zeros, shape[1:], self.param_dtype,
                                ("classes",))}
        x, p = promote(self, x, p)
        return dense(p, x)


class Backbone(nn.Module):
    """The fields every classifier has, and its call: ``forward_features``, then the head.

    `__call__(x, train, pre_logits)` -> logits ``[B, num_classes]`` (or the pooled features);
    a subclass defines ``forward_features(x, train=...)`` and ``head_pool`` (`ClassifierHead`).
    """

    num_classes: int = 1000
    drop_rate: float = 0.0  # head dropout (timm `drop_rate`)
    proj_drop_rate: float = 0.0  # FFN and attention-projection dropout
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    hal: HalConfig | None = None  # None: the baseline
    impl: str = "auto"  # one of halluvit_jax.layers.config.IMPLS
    remat: str = "none"  # "none" | "block" | a jax.checkpoint_policies name (registry.remat_block)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    head_pool = "avg"

    def block_config(self, **overrides) -> BlockConfig:
        """The `BlockConfig` of this backbone's fields (``overrides``: family settings, e.g.
        NextViT's ``act="relu"``)."""
        return BlockConfig(hal=self.hal, impl=self.impl, dtype=self.dtype,
                           param_dtype=self.param_dtype, drop=self.proj_drop_rate,
                           attn_drop=self.attn_drop_rate, remat=self.remat, **overrides)

    def make_head(self) -> ClassifierHead:
        """The classifier head; assigned to ``self.head`` in setup, its params are
        ``head/kernel`` and ``head/bias``."""
        return ClassifierHead(self.num_classes, self.head_pool, self.drop_rate, self.dtype,
                              self.param_dtype)

    def __call__(self, x: jax.Array, *, train: bool = False, pre_logits: bool = False) -> jax.Array:
        features = self.forward_features(x, train=train)
        return self.head(features, train=train, pre_logits=pre_logits)
