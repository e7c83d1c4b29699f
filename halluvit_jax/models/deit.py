"""DeiT (timm `deit_*_patch16_224`) and its `_hal` variants (hMHSA + cFFN).

A plain ViT: 16x16 patch conv, class token, learned absolute position embedding, pre-norm
blocks (LayerNorm eps 1e-6, exact GELU), final norm, class-token head. Parameter names follow
timm's state_dict (`blocks_{i}/attn/qkv`, ...) so conversion is a rename plus transposes.

`_hal` variants replace every `Attention` by `HalAttention` (keys: the class token plus the
patch grid, which IHH convolves over) and every `Mlp` by `CompactMlp`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from halluvit_jax.layers import DropPath, HalConfig, drop_path_rates
from halluvit_jax.layers.common import timm_trunc_normal, torch_conv_uniform
from halluvit_jax.models.common import Backbone, BlockConfig
from halluvit_jax.models.registry import InputConfig, register_model

LN_EPS = 1e-6


class Block(nn.Module):
    """Pre-norm transformer block: `x + DropPath(Attn(LN(x)))`, `x + DropPath(MLP(LN(x)))`."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    kv_grid: tuple[int, int] = (14, 14)
    num_prefix_tokens: int = 1
    drop_path: float = 0.0
    cfg: BlockConfig = BlockConfig()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        attn = cfg.attention(self.dim, self.num_heads, name="attn")
        mlp = cfg.mlp(int(self.dim * self.mlp_ratio))
        # The norms are deferred into the first matmul of attn and mlp (see PreNorm): the
        # backward pass rebuilds their output from x, which it keeps anyway.
        y = attn(cfg.layer_norm(LN_EPS, "norm1")(x, defer=True), kv_grid=self.kv_grid,
                 num_prefix_tokens=self.num_prefix_tokens, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = mlp(cfg.layer_norm(LN_EPS, "norm2")(x, defer=True), train=train)
        return x + DropPath(self.drop_path)(y, train=train)


class VisionTransformer(Backbone):
    """DeiT / ViT classifier on NHWC images of exactly `img_size` x `img_size`.

    `__call__(x, train, pre_logits)` -> logits `[B, num_classes]` (or the pooled class token);
    `forward_features(x, train)` -> normalized tokens `[B, 1 + H*W, C]` (class token first).
    `num_classes=0` drops the head. For another resolution build with `img_size=` and resample
    a checkpoint's `pos_embed` with `resample_pos_embed` (the timm converter does it).
    """

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    pos_drop_rate: float = 0.0

    head_pool = "token"

    def attention_heads(self) -> list[int]:
        """The head count of every attention layer."""
        return [self.num_heads] * self.depth

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return (g, g)

    def setup(self):
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}; "
                "pick an img_size divisible by the patch size."
            )
        c, p = self.embed_dim, self.patch_size
        fan_in = 3 * p * p
        self.patch_embed = nn.Conv(
            c, (p, p), strides=(p, p), padding="VALID",
            kernel_init=torch_conv_uniform(fan_in), bias_init=torch_conv_uniform(fan_in),
            dtype=self.dtype, param_dtype=self.param_dtype,
        )
        gh, gw = self.grid_size
        self.cls_token = self.param(
            "cls_token", nn.initializers.normal(1e-6), (1, 1, c), self.param_dtype
        )
        self.pos_embed = self.param(
            "pos_embed", timm_trunc_normal, (1, 1 + gh * gw, c), self.param_dtype
        )
        dpr = drop_path_rates(self.drop_path_rate, self.depth)
        cfg = self.block_config()
        block = cfg.remat_block(Block)
        self.blocks = [
            block(c, self.num_heads, mlp_ratio=self.mlp_ratio, kv_grid=(gh, gw),
                  num_prefix_tokens=1, drop_path=dpr[i], cfg=cfg)
            for i in range(self.depth)
        ]
        self.norm = cfg.layer_norm(LN_EPS)
        self.pos_drop = nn.Dropout(self.pos_drop_rate)
        self.head = self.make_head()

    def forward_features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Patch embed + class token + position embedding, the blocks, the final norm."""
        if x.ndim != 4 or x.shape[1:3] != (self.img_size, self.img_size) or x.shape[3] != 3:
            raise ValueError(
                f"DeiT built for img_size={self.img_size} expects NHWC input "
                f"[B, {self.img_size}, {self.img_size}, 3], got {tuple(x.shape)}; build the model "
                f"with img_size={x.shape[1] if x.ndim == 4 else '<H>'} (and resample pos_embed)."
            )
        x = self.patch_embed(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (b, 1, c))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
        x = self.pos_drop(x, deterministic=not train)
        for block in self.blocks:
            x = block(x, train)
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# Position-embedding resampling (PyTorch's bicubic with antialias=True, as timm uses).


def _aa_bicubic_filter(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys cubic kernel with a=-0.5 (PIL / PyTorch antialiased bicubic)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _aa_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` interpolation matrix of `F.interpolate(mode='bicubic', antialias=True)`.

    Mirrors ATen's `_compute_weights_aa` (align_corners=False): the kernel widens by the
    downscale factor, taps are clipped to the input and renormalized.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax)
        w = _aa_bicubic_filter((taps - center + 0.5) * invscale)
        total = w.sum()
        weights[i, xmin:xmax] = w / total if total != 0.0 else w
    return weights


def resample_pos_embed(
    pos_embed: Any,
    new_grid: Sequence[int],
    num_prefix_tokens: int = 1,
    old_grid: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample the grid part of a `[1, P + H*W, C]` position embedding to `new_grid`.

    Bicubic with antialiasing, as timm's `resample_abs_pos_embed` (PyTorch
    `F.interpolate(mode='bicubic', antialias=True)`); prefix (class) tokens are kept as they
    are. The old grid is taken as square unless `old_grid` is given. Returns numpy float32
    (computed in float64).
    """
    pos = np.asarray(pos_embed)
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, tokens, C], got {pos.shape}.")
    n_grid = pos.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = round(math.sqrt(n_grid))
        if side * side != n_grid:
            raise ValueError(
                f"pos_embed has {n_grid} grid tokens, not a square grid; pass old_grid=(H, W)."
            )
        old_grid = (side, side)
    oh, ow = old_grid
    nh, nw = new_grid
    if oh * ow != n_grid:
        raise ValueError(f"old_grid {oh}x{ow} does not match the {n_grid} grid tokens of pos_embed.")
    prefix, grid = pos[:, :num_prefix_tokens], pos[0, num_prefix_tokens:]
    if (oh, ow) == (nh, nw):
        return pos.astype(np.float32)
    grid = grid.reshape(oh, ow, -1).astype(np.float64)
    wh, ww = _aa_bicubic_matrix(oh, nh), _aa_bicubic_matrix(ow, nw)
    out = np.einsum("ph,hwc,qw->pqc", wh, grid, ww).reshape(1, nh * nw, -1)
    return np.concatenate([prefix.astype(np.float64), out], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Registered variants.

_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
# hMHSA needs an even head count: DeiT-T's 3 heads become 4 heads of 48 (docs/design.md section 2).
_HAL_HEADS = {"tiny": 4, "small": 6, "base": 12}

for _size, (_dim, _heads) in _SIZES.items():
    register_model(
        f"deit_{_size}", InputConfig(crop_pct=0.9, timm_name=f"deit_{_size}_patch16_224")
    )(functools.partial(VisionTransformer, embed_dim=_dim, depth=12, num_heads=_heads))
    register_model(f"deit_{_size}_hal", InputConfig(crop_pct=0.9))(functools.partial(
        VisionTransformer, embed_dim=_dim, depth=12, num_heads=_HAL_HEADS[_size], hal=HalConfig()))
