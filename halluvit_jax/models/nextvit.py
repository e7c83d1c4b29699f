"""Next-ViT (timm `nextvit_small/base/large`) and its `_hal` variants, NHWC Flax Linen.

The baselines follow timm's `NextViT` block for block, so timm state_dicts convert one-to-one
(`halluvit_jax.convert.timm_nextvit`) and logits match. A `_hal` variant swaps the E-MHSA of
every Next Transformer Block (NTB) for hMHSA (`HalAttention`) and the MLP of every block, NCB
and NTB, for cFFN (`CompactMlp`), docs/design.md section 5. NextViT's own BatchNorms (momentum 0.9 = PyTorch 0.1, eps 1e-5) have
`nn.BatchNorm`'s variables (`halluvit_jax.layers.BatchNorm`, whose train-mode backward pass keeps
less).

Deploy form (`merge_pre_bn`, timm's `reparameterize()` / `merge_pre_bn`): the pre-BatchNorms that
feed a linear layer are folded into it and are absent from the model: each block's `norm` (NCB)
or `norm1` / `norm2` (NTB) into the E-MHSA's q / kv (or qkv) and the MLP's first layer, and
`sr_norm` with `norm1` into kv (the key pooling is per channel and linear, so it commutes).
`halluvit_jax.reparameterize` folds the training variables into it; the post-conv BatchNorms
(stem, patch embeddings, MHCA, the final norm) stay.

Parameter tree (timm key -> ours): `stem.{i}` -> `stem_{i}`, `stages.{s}.blocks.{b}` ->
`stages_{s}/blocks_{b}`, `head.fc` -> `head`. All 1x1 convolutions are `nn.Dense` on the channel
axis (kernel `[in, out]`). E-MHSA is a `halluvit_jax.layers.Attention` named `e_mhsa` (q + fused
`kv` when keys are pooled, fused `qkv` when sr = 1); timm's `e_mhsa.norm` (the BatchNorm1d after
the key pooling) is the block-level `sr_norm`.

E-MHSA key pooling is timm's `AvgPool1d(sr^2)` over raster-ordered tokens: windows of sr^2
consecutive tokens, straddling image rows, trailing tokens dropped (`sequence_avg_pool`). The
N' pooled keys have no true 2-D layout; hMHSA's intra-head hallucination needs one, and we lay
them out as `(H / sr, W / sr)` in raster order (`pooled_key_grid`), which is exact in count
(N' = H W / sr^2) whenever sr divides H and W (every stage at 224, 256, 384, ...).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halluvit_jax.layers import DropPath, HalConfig, drop_path_rates, fused, run
from halluvit_jax.layers.common import Dtype, grouped_conv3x3, timm_trunc_normal
from halluvit_jax.models.common import Backbone, BlockConfig
from halluvit_jax.models.registry import InputConfig, register_model

# NextViT's BatchNorms and its cFFNs' have `BlockConfig`'s momentum 0.9 (PyTorch 0.1), eps 1e-5.
HEAD_DIM = 32  # the E-MHSA head width and the MHCA group width


def make_divisible(v: float, divisor: int = 32) -> int:
    """timm / Next-ViT `_make_divisible`: round to a multiple, never more than 10% down."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def avg_pool_2x2_ceil(x: jax.Array) -> jax.Array:
    """`AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)` on NHWC.

    Odd sizes get a partial last window averaged over its valid pixels only.
    """
    h, w = x.shape[1:3]
    return nn.avg_pool(
        x, (2, 2), strides=(2, 2), padding=((0, h % 2), (0, w % 2)), count_include_pad=False
    )


def sequence_avg_pool(tokens: jax.Array, window: int) -> jax.Array:
    """timm's `AvgPool1d(window, window)` over the token axis of `[B, N, C]` -> `[B, N // window, C]`.

    Averages `window` consecutive raster-ordered tokens; trailing tokens that do not fill a
    window are dropped, as PyTorch does.
    """
    b, n, c = tokens.shape
    m = n // window
    if m == 0:
        raise ValueError(
            f"E-MHSA key pooling needs at least {window} tokens (sr^2) but the stage has {n}; "
            "use a larger input resolution or smaller sr_ratios."
        )
    return tokens[:, : m * window].reshape(b, m, window, c).mean(axis=2)


def pooled_key_grid(height: int, width: int, sr_ratio: int) -> tuple[int, int] | None:
    """The `(Hk, Wk)` grid we assign to the pooled keys: `(H / sr, W / sr)`, or None if sr ∤ H, W."""
    if sr_ratio == 1:
        return height, width
    if height % sr_ratio or width % sr_ratio:
        return None
    return height // sr_ratio, width // sr_ratio


def _dense(features: int, name: str, cfg: BlockConfig, use_bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features, use_bias=use_bias, kernel_init=timm_trunc_normal, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, name=name,
    )


class ConvNormAct(nn.Module):
    """Stem unit: 3x3 conv (pad 1, no bias) -> BatchNorm -> ReLU."""

    features: int
    stride: int
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = nn.Conv(
            self.features, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)), use_bias=False,
            kernel_init=timm_trunc_normal, dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype,
            name="conv",
        )(x)
        x = self.cfg.batch_norm("norm")(x, use_running_average=not train)
        return nn.relu(x)


class PatchEmbed(nn.Module):
    """stride 2: 2x2 avg-pool (ceil) + 1x1 conv + BN; stride 1: 1x1 conv + BN if widths differ, else identity."""

    features: int
    stride: int
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if self.stride == 2:
            x = avg_pool_2x2_ceil(x)
        elif self.stride != 1:
            raise ValueError(f"NextViT PatchEmbed supports stride 1 or 2, got {self.stride}.")
        elif x.shape[-1] == self.features:
            return x
        x = _dense(self.features, "conv", self.cfg)(x)
        return self.cfg.batch_norm("norm")(x, use_running_average=not train)


class GroupedConv3x3(nn.Module):
    """``nn.Conv(c, (3, 3), padding=1, feature_group_count=groups, use_bias=False)`` (same param
    ``kernel`` ``[3, 3, c / groups, c]``, timm init). The fused path runs one dense conv per group
    (`halluvit_jax.layers.fused.grouped_conv`): XLA's CPU grouped conv is ~2x slower forward and
    7-80x slower forward + backward at NextViT-S's shapes."""

    groups: int
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param("kernel", timm_trunc_normal, (3, 3, c // self.groups, c), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        plain = lambda k, x: grouped_conv3x3(x, k, self.groups)  # noqa: E731
        fused_ = lambda k, x: fused.grouped_conv(x, k, self.groups)  # noqa: E731
        return run(self.impl, plain, fused_, kernel, x)


class ConvAttention(nn.Module):
    """MHCA: grouped 3x3 conv (groups = C / head_dim, no bias) -> BN -> ReLU -> 1x1 projection."""

    cfg: BlockConfig
    head_dim: int = HEAD_DIM

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        if c % self.head_dim:
            raise ValueError(
                f"MHCA width {c} is not a multiple of head_dim={self.head_dim}; choose widths "
                "divisible by head_dim."
            )
        x = GroupedConv3x3(c // self.head_dim, self.cfg.impl, self.cfg.dtype,
                           self.cfg.param_dtype, name="group_conv3x3")(x)
        x = nn.relu(self.cfg.batch_norm("norm")(x, use_running_average=not train))
        return _dense(c, "projection", self.cfg)(x)


def _pre_norm(cfg: BlockConfig, name: str, x: jax.Array, train: bool, merged: bool) -> jax.Array:
    """A block's pre-BatchNorm, or ``x`` itself once it is merged into the next linear layer."""
    return x if merged else cfg.batch_norm(name)(x, use_running_average=not train)


class NextConvBlock(nn.Module):
    """NCB: patch_embed, x + MHCA(x), x + MLP(BN(x)) (MLP ratio 3; cFFN in hal models).

    ``merge_pre_bn``: the deploy form, BN merged into the MLP's first layer (no ``norm``).
    """

    out_chs: int
    stride: int
    drop_path: float
    cfg: BlockConfig
    head_dim: int = HEAD_DIM
    mlp_ratio: float = 3.0
    merge_pre_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        x = PatchEmbed(self.out_chs, self.stride, cfg, name="patch_embed")(x, train=train)
        mhca = ConvAttention(cfg, self.head_dim, name="mhca")(x, train=train)
        x = x + DropPath(self.drop_path)(mhca, train=train)
        out = _pre_norm(cfg, "norm", x, train, self.merge_pre_bn)
        out = cfg.mlp(int(self.out_chs * self.mlp_ratio))(out, train=train)
        return x + DropPath(self.drop_path)(out, train=train)


class NextTransformerBlock(nn.Module):
    """NTB: E-MHSA on a `mix_block_ratio` share of the channels, MHCA on the rest, then the MLP.

    E-MHSA: q from BN1(x); keys/values from BN1(x) average-pooled over sr^2 consecutive tokens
    and normalized by `sr_norm` (timm's BatchNorm1d), or from BN1(x) itself when sr = 1.
    Drop-path rates: 0.75 * dp on the attention branch, 0.25 * dp on MHCA, dp on the MLP (timm).
    ``merge_pre_bn``: the deploy form, without ``norm1``, ``sr_norm`` and ``norm2`` (merged into
    q, kv / qkv and the MLP's first layer).
    """

    out_chs: int
    stride: int
    sr_ratio: int
    drop_path: float
    cfg: BlockConfig
    num_heads: int | None = None  # default: mhsa width / head_dim
    head_dim: int = HEAD_DIM
    mix_block_ratio: float = 0.75
    mlp_ratio: float = 2.0
    merge_pre_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg, mix = self.cfg, self.mix_block_ratio
        mhsa_chs = make_divisible(int(self.out_chs * mix), 32)
        mhca_chs = self.out_chs - mhsa_chs
        if mhca_chs <= 0:
            raise ValueError(
                f"NTB width {self.out_chs} leaves no MHCA channels (mhsa part {mhsa_chs}); use a "
                "larger transformer width."
            )
        heads = self.num_heads or mhsa_chs // self.head_dim
        x = PatchEmbed(mhsa_chs, self.stride, cfg, name="patch_embed")(x, train=train)
        b, h, w, c = x.shape

        merged = self.merge_pre_bn
        tokens = _pre_norm(cfg, "norm1", x, train, merged).reshape(b, h * w, c)
        kv = None
        grid = pooled_key_grid(h, w, self.sr_ratio)
        if self.sr_ratio > 1:
            kv = _pre_norm(cfg, "sr_norm", sequence_avg_pool(tokens, self.sr_ratio**2), train, merged)
        if cfg.hal is not None:
            if grid is None:
                raise ValueError(
                    f"hMHSA lays the pooled keys of a {h}x{w} stage on a (H/sr, W/sr) grid, but "
                    f"sr={self.sr_ratio} does not divide {h}x{w}; use an input size whose stage "
                    "sizes are multiples of the sr ratios (with the default ones: a multiple of "
                    "32, e.g. 224, 256 or 384)."
                )
        attn = cfg.attention(mhsa_chs, heads, name="e_mhsa")
        out = attn(tokens, kv, kv_grid=grid, train=train).reshape(b, h, w, c)
        x = x + DropPath(self.drop_path * mix)(out, train=train)

        out = PatchEmbed(mhca_chs, 1, cfg, name="projection")(x, train=train)
        mhca = ConvAttention(cfg, self.head_dim, name="mhca")(out, train=train)
        out = out + DropPath(self.drop_path * (1.0 - mix))(mhca, train=train)
        x = jnp.concatenate([x, out], axis=-1)

        out = _pre_norm(cfg, "norm2", x, train, merged)
        out = cfg.mlp(int(self.out_chs * self.mlp_ratio))(out, train=train)
        return x + DropPath(self.drop_path)(out, train=train)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block of a stage: its type, output width, stride, drop-path rate, sr and heads."""

    kind: str  # "ncb" | "ntb"
    out_chs: int
    stride: int
    drop_path: float
    sr_ratio: int = 1
    num_heads: int | None = None


class NextStage(nn.Module):
    """A sequence of NCB / NTB blocks, params `blocks_{i}`."""

    blocks: tuple[BlockSpec, ...]
    cfg: BlockConfig
    head_dim: int = HEAD_DIM
    mix_block_ratio: float = 0.75
    merge_pre_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg, merged = self.cfg, self.merge_pre_bn
        ncb, ntb = (cfg.remat_block(b) for b in (NextConvBlock, NextTransformerBlock))
        for i, s in enumerate(self.blocks):
            if s.kind == "ncb":
                block = ncb(s.out_chs, s.stride, s.drop_path, cfg, self.head_dim,
                            merge_pre_bn=merged, name=f"blocks_{i}")
            else:
                block = ntb(s.out_chs, s.stride, s.sr_ratio, s.drop_path, cfg, s.num_heads,
                            self.head_dim, self.mix_block_ratio, merge_pre_bn=merged,
                            name=f"blocks_{i}")
            x = block(x, train)
        return x


class NextViT(Backbone):
    """Next-ViT classifier (timm `NextViT`), NHWC input `[B, H, W, 3]`.

    Stage layout as timm: stage 0 is `depths[0]` NCBs; stages 1 and 3 are `depths[s] - 1` NCBs
    then one NTB; stage 2 repeats (4 NCBs, 1 NTB) `depths[2] / 5` times. `conv_widths` are the NCB
    widths per stage, `transformer_widths` the NTB output widths of stages 1-3 (timm fixes them
    at (96, 192, 384, 768) and (256, 512, 1024); smaller ones are for tests).
    `num_heads`: per-stage E-MHSA head counts (None entries / None = NTB mhsa width / head_dim).
    `drop_rate` is the head dropout, `proj_drop_rate` the MLP / attention-projection dropout.
    `merge_pre_bn`: the deploy form, the blocks' pre-BatchNorms merged into the next linear
    layers (module docstring); None (default) follows ``hal.deploy`` (False for a baseline, whose
    deploy form `halluvit_jax.models.deploy_form` sets it True). `pre_bn_merged()` says which.
    """

    depths: Sequence[int] = (3, 4, 10, 3)
    stem_chs: Sequence[int] = (64, 32, 64)
    conv_widths: Sequence[int] = (96, 192, 384, 768)
    transformer_widths: Sequence[int] = (256, 512, 1024)
    strides: Sequence[int] = (1, 2, 2, 2)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    head_dim: int = HEAD_DIM
    mix_block_ratio: float = 0.75
    num_heads: Sequence[int | None] | None = None
    in_chans: int = 3
    drop_path_rate: float = 0.1
    merge_pre_bn: bool | None = None

    def pre_bn_merged(self) -> bool:
        """Whether the blocks' pre-BatchNorms are merged (the deploy form)."""
        if self.merge_pre_bn is not None:
            return bool(self.merge_pre_bn)
        return self.hal is not None and self.hal.deploy

    def _validate(self) -> None:
        d = tuple(self.depths)
        if len(d) != 4 or min(d) < 1 or d[2] % 5:
            raise ValueError(
                f"NextViT depths must be 4 positive ints with depths[2] a multiple of 5 (stage 2 "
                f"repeats 4 NCB + 1 NTB), got {d}."
            )
        for name, n in (("stem_chs", 3), ("conv_widths", 4), ("transformer_widths", 3),
                        ("strides", 4), ("sr_ratios", 4)):
            if len(getattr(self, name)) != n:
                raise ValueError(f"NextViT {name} needs {n} entries, got {tuple(getattr(self, name))}.")
        if self.num_heads is not None and len(self.num_heads) != 4:
            raise ValueError(f"num_heads needs one entry per stage (4), got {tuple(self.num_heads)}.")

    def attention_heads(self) -> list[int]:
        """The head count of every attention layer (one E-MHSA per NTB)."""
        return [s.num_heads or make_divisible(int(s.out_chs * self.mix_block_ratio), 32)
                // self.head_dim for stage in self.block_specs() for s in stage if s.kind == "ntb"]

    def block_specs(self) -> list[list[BlockSpec]]:
        """Per-stage block specs with timm's drop-path rates (linear 0..rate over all blocks)."""
        self._validate()
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        cw, tw = tuple(self.conv_widths), (None,) + tuple(self.transformer_widths)
        layouts = [
            [("ncb", cw[0])] * self.depths[0],
            [("ncb", cw[1])] * (self.depths[1] - 1) + [("ntb", tw[1])],
            ([("ncb", cw[2])] * 4 + [("ntb", tw[2])]) * (self.depths[2] // 5),
            [("ncb", cw[3])] * (self.depths[3] - 1) + [("ntb", tw[3])],
        ]
        specs, offset = [], 0
        for s, layout in enumerate(layouts):
            heads = None if self.num_heads is None else self.num_heads[s]
            specs.append([
                BlockSpec(kind, width, self.strides[s] if b == 0 else 1, rates[offset + b],
                          self.sr_ratios[s], heads)
                for b, (kind, width) in enumerate(layout)
            ])
            offset += self.depths[s]
        return specs

    def setup(self):
        cfg = self.block_config(act="relu")
        sc = tuple(self.stem_chs)
        self.stem = [
            ConvNormAct(c, s, cfg) for c, s in ((sc[0], 2), (sc[1], 1), (sc[2], 1), (sc[2], 2))
        ]
        self.stages = [NextStage(tuple(specs), cfg, self.head_dim, self.mix_block_ratio,
                                 self.pre_bn_merged()) for specs in self.block_specs()]
        self.norm = cfg.batch_norm()
        self.head = self.make_head()

    def forward_features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Stem, stages and the final BatchNorm: `[B, H/32, W/32, C]` features."""
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ValueError(
                f"NextViT expects NHWC images [B, H, W, {self.in_chans}], got shape {x.shape}; "
                "transpose NCHW inputs with x.transpose(0, 2, 3, 1)."
            )
        for layer in self.stem:
            x = layer(x, train=train)
        for stage in self.stages:
            x = stage(x, train=train)
        return self.norm(x, use_running_average=not train)


# --------------------------------------------------------------------------------------------
# Registered variants.

_VARIANTS: dict[str, dict[str, Any]] = {
    "nextvit_small": {"depths": (3, 4, 10, 3), "drop_path_rate": 0.1},
    "nextvit_base": {"depths": (3, 4, 20, 3), "drop_path_rate": 0.2},
    "nextvit_large": {"depths": (3, 4, 30, 3), "drop_path_rate": 0.2},
}


for _name, _cfg in _VARIANTS.items():
    register_model(_name, InputConfig(crop_pct=0.95, timm_name=_name))(
        functools.partial(NextViT, **_cfg))
    register_model(f"{_name}_hal", InputConfig(crop_pct=0.95))(
        functools.partial(NextViT, **_cfg, hal=HalConfig()))
