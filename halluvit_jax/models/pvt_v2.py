"""PVTv2 (timm `pvt_v2_b0` ... `pvt_v2_b5`) and its `_hal` variants (hMHSA + cFFN).

Four stages of overlapping patch embeddings (conv + LayerNorm eps 1e-5) and pre-norm blocks
(LayerNorm eps 1e-6). Attention is spatial-reduction attention: the keys/values come from an
`sr x sr` stride-`sr` conv of the tokens plus a LayerNorm (eps 1e-5), laid out on the reduced
grid `kv_grid`; the last stage (sr=1) attends to the tokens themselves through one fused `qkv`
projection. The FFN has a 3x3 depthwise conv after fc1. Any input resolution works.

Parameter names follow timm (`stages_{i}/blocks_{j}/attn/q`, ...), except that the SR conv and
its norm live on the block as `sr` and `sr_norm` (timm: `attn.sr`, `attn.norm`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from halluvit_jax.layers import DropPath, HalConfig, drop_path_rates
from halluvit_jax.models.common import Backbone, BlockConfig
from halluvit_jax.models.registry import InputConfig, register_model

EMBED_LN_EPS = 1e-5  # patch-embed and spatial-reduction norms (torch nn.LayerNorm default)
BLOCK_LN_EPS = 1e-6  # block and stage norms (timm LayerNorm)


def _conv_init(kernel: int, out_channels: int, groups: int = 1):
    """PVTv2's conv init: normal(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups."""
    return nn.initializers.normal(stddev=math.sqrt(2.0 / (kernel * kernel * out_channels // groups)))


class OverlapPatchEmbed(nn.Module):
    """Conv (kernel `patch_size`, `stride`, symmetric padding `patch_size // 2`) + LayerNorm, NHWC."""

    embed_dim: int
    patch_size: int = 7
    stride: int = 4
    cfg: BlockConfig = BlockConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, pad = self.patch_size, self.patch_size // 2
        x = nn.Conv(
            self.embed_dim, (k, k), strides=(self.stride, self.stride), padding=((pad, pad), (pad, pad)),
            kernel_init=_conv_init(k, self.embed_dim), dtype=self.cfg.dtype,
            param_dtype=self.cfg.param_dtype, name="proj",
        )(x)
        return self.cfg.layer_norm(EMBED_LN_EPS, "norm")(x)


class Block(nn.Module):
    """`x + DropPath(SRA(LN(x)))`, `x + DropPath(MlpDW(LN(x)))` on tokens `[B, H*W, C]`."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    sr_ratio: int = 1
    drop_path: float = 0.0
    cfg: BlockConfig = BlockConfig()

    @nn.compact
    def __call__(self, x: jax.Array, grid: tuple[int, int], train: bool = False) -> jax.Array:
        cfg = self.cfg
        attn = cfg.attention(self.dim, self.num_heads, name="attn")
        mlp = cfg.mlp(int(self.dim * self.mlp_ratio), use_dwconv=True)
        if self.sr_ratio > 1:  # keys from the spatially reduced, normalized tokens
            y = cfg.layer_norm(BLOCK_LN_EPS, "norm1")(x)
            b, _, c = y.shape
            r = self.sr_ratio
            reduced = nn.Conv(
                c, (r, r), strides=(r, r), padding="VALID", kernel_init=_conv_init(r, c),
                name="sr", dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            )(y.reshape(b, grid[0], grid[1], c))
            kv_grid = tuple(reduced.shape[1:3])
            kv = cfg.layer_norm(EMBED_LN_EPS, "sr_norm")(reduced.reshape(b, -1, c))
        else:  # the last stage attends to the tokens themselves: the norm goes into qkv
            y, kv, kv_grid = cfg.layer_norm(BLOCK_LN_EPS, "norm1")(x, defer=True), None, tuple(grid)
        y = attn(y, kv, kv_grid=kv_grid, num_prefix_tokens=0, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = mlp(cfg.layer_norm(BLOCK_LN_EPS, "norm2")(x, defer=True), grid, train=train)
        return x + DropPath(self.drop_path)(y, train=train)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage's shape: width, depth, heads, MLP ratio, SR ratio and per-block drop-path rates."""

    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    sr_ratio: int
    drop_paths: tuple[float, ...]


class Stage(nn.Module):
    """[downsample (3x3 s2 OverlapPatchEmbed)] -> blocks -> LayerNorm; NHWC in and out."""

    spec: StageSpec
    downsample: bool
    cfg: BlockConfig = BlockConfig()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        s, cfg = self.spec, self.cfg
        if self.downsample:
            x = OverlapPatchEmbed(s.dim, patch_size=3, stride=2, cfg=cfg, name="downsample")(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        block = cfg.remat_block(Block, static_argnums=(2, 3))
        for i in range(s.depth):
            x = block(s.dim, s.num_heads, s.mlp_ratio, s.sr_ratio, s.drop_paths[i], cfg,
                      name=f"blocks_{i}")(x, (h, w), train)
        x = cfg.layer_norm(BLOCK_LN_EPS, "norm")(x)
        return x.reshape(b, h, w, c)


class PyramidVisionTransformerV2(Backbone):
    """PVTv2 classifier on NHWC images of any size (strides 4/8/16/32).

    `__call__(x, train, pre_logits)` -> logits (or the pooled features); `forward_features(x,
    train)` -> the last stage's normalized map `[B, H/32, W/32, C]`. `num_classes=0` drops the head.
    """

    depths: Sequence[int] = (2, 2, 2, 2)
    embed_dims: Sequence[int] = (32, 64, 160, 256)
    num_heads: Sequence[int] = (1, 2, 5, 8)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    mlp_ratios: Sequence[float] = (8.0, 8.0, 4.0, 4.0)

    def attention_heads(self) -> list[int]:
        """The head count of every attention layer."""
        return [h for h, d in zip(self.num_heads, self.depths) for _ in range(d)]

    def setup(self):
        n = len(self.depths)
        for field in ("embed_dims", "num_heads", "sr_ratios", "mlp_ratios"):
            if len(getattr(self, field)) != n:
                raise ValueError(
                    f"PVTv2 {field}={tuple(getattr(self, field))} must have one entry per stage "
                    f"({n}, from depths={tuple(self.depths)})."
                )
        cfg = self.block_config()
        self.patch_embed = OverlapPatchEmbed(self.embed_dims[0], patch_size=7, stride=4, cfg=cfg)
        dpr = drop_path_rates(self.drop_path_rate, sum(self.depths))
        stages, start = [], 0
        for i in range(n):
            spec = StageSpec(self.embed_dims[i], self.depths[i], self.num_heads[i],
                             self.mlp_ratios[i], self.sr_ratios[i],
                             tuple(dpr[start:start + self.depths[i]]))
            stages.append(Stage(spec, downsample=i > 0, cfg=cfg))
            start += self.depths[i]
        self.stages = stages
        self.head = self.make_head()

    def forward_features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Stem and the four stages; the last stage's normalized NHWC feature map."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"PVTv2 expects NHWC images [B, H, W, 3], got {tuple(x.shape)}.")
        x = self.patch_embed(x)
        for stage in self.stages:
            x = stage(x, train=train)
        return x


# --------------------------------------------------------------------------------------------
# Registered variants (timm pvt_v2.py).

_B0_DIMS = (32, 64, 160, 256)
_DIMS = (64, 128, 320, 512)
_VARIANTS: dict[str, dict[str, Any]] = {
    "b0": dict(depths=(2, 2, 2, 2), embed_dims=_B0_DIMS),
    "b1": dict(depths=(2, 2, 2, 2), embed_dims=_DIMS),
    "b2": dict(depths=(3, 4, 6, 3), embed_dims=_DIMS),
    "b3": dict(depths=(3, 4, 18, 3), embed_dims=_DIMS),
    "b4": dict(depths=(3, 8, 27, 3), embed_dims=_DIMS),
    "b5": dict(depths=(3, 6, 40, 3), embed_dims=_DIMS, mlp_ratios=(4.0, 4.0, 4.0, 4.0)),
}
_HEADS = (1, 2, 5, 8)
# hMHSA needs even head counts: stages (1, 2, 5, 8) -> (2, 2, 4, 8) (docs/design.md section 2).
_HAL_HEADS = (2, 2, 4, 8)


for _v, _cfg in _VARIANTS.items():
    register_model(f"pvt_v2_{_v}", InputConfig(crop_pct=0.9, timm_name=f"pvt_v2_{_v}"))(
        functools.partial(PyramidVisionTransformerV2, **_cfg, num_heads=_HEADS))
    register_model(f"pvt_v2_{_v}_hal", InputConfig(crop_pct=0.9))(functools.partial(
        PyramidVisionTransformerV2, **_cfg, num_heads=_HAL_HEADS, hal=HalConfig()))
