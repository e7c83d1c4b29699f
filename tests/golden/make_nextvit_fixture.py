"""Regenerate `tests/golden/nextvit.npz`: a reduced real timm NextViT, its weights and logits.

    python tests/golden/make_nextvit_fixture.py      # needs torch + timm

timm's `NextViT` hard-codes its widths (96 ... 1024), far too large for a small fixture, so the
model is a timm `NextViT` whose stem, stages, final norm and head are rebuilt from timm's own
classes (`ConvNormAct`, `NextStage`, `NextConvBlock`, `NextTransformerBlock`, `ClassifierHead`)
with reduced widths; the forward is timm's. The config keeps every block type and every
PatchEmbed variant: NCB with pool+1x1 (stride 2), 1x1 (stride 1, new width) and identity
patch-embeds; NTBs with pool+1x1 (stage 1), 1x1 (stage 2) and identity (stage 3) patch-embeds,
E-MHSA with pooled keys (sr 4, 2) and without (sr 1).

Weights are re-drawn with fan-in scaling so that activations stay O(1) (q and k scaled down so
that attention stays soft and the float32 reference well conditioned), BatchNorm running stats
are set from training-mode passes and then perturbed, BN affines are random; every tensor is
rounded to float16 (stored as float16, exact in float32) to keep the file small. Inputs: a 64x64
batch of 2 and a 72x72 image (odd stage sizes 9, 5, 3: ceil-mode pooling and E-MHSA windows
that drop trailing tokens).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

# Reduced model: the same field names as halluvit_jax.models.nextvit.NextViT.
CONFIG = {
    "depths": (1, 1, 5, 2),
    "stem_chs": (16, 16, 24),
    "conv_widths": (32, 48, 48, 96),
    "transformer_widths": (128, 128, 128),
    "head_dim": 16,
    "num_classes": 10,
    "drop_path_rate": 0.0,
}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nextvit.npz")


def build_timm_model(timm, cfg=CONFIG):
    """A timm NextViT with `cfg`'s widths, assembled from timm's own NextViT building blocks."""
    import torch
    from timm.layers import ClassifierHead
    from timm.models import nextvit as tnv

    depths = cfg["depths"]
    model = tnv.NextViT(
        in_chans=3, num_classes=cfg["num_classes"], depths=(1, 1, 5, 1),
        stem_chs=cfg["stem_chs"], head_dim=cfg["head_dim"], drop_path_rate=0.0,
    )
    cw, tw = cfg["conv_widths"], cfg["transformer_widths"]
    ncb, ntb = tnv.NextConvBlock, tnv.NextTransformerBlock
    stage_chs = [
        [cw[0]] * depths[0],
        [cw[1]] * (depths[1] - 1) + [tw[0]],
        [cw[2]] * 4 + [tw[1]],
        [cw[3]] * (depths[3] - 1) + [tw[2]],
    ]
    stage_types = [
        [ncb] * depths[0],
        [ncb] * (depths[1] - 1) + [ntb],
        [ncb] * 4 + [ntb],
        [ncb] * (depths[3] - 1) + [ntb],
    ]
    sc = cfg["stem_chs"]
    relu = torch.nn.ReLU
    model.stem = torch.nn.Sequential(
        tnv.ConvNormAct(3, sc[0], 3, stride=2, act_layer=relu),
        tnv.ConvNormAct(sc[0], sc[1], 3, stride=1, act_layer=relu),
        tnv.ConvNormAct(sc[1], sc[2], 3, stride=1, act_layer=relu),
        tnv.ConvNormAct(sc[2], sc[2], 3, stride=2, act_layer=relu),
    )
    in_chs, stages = sc[2], []
    for s, (chs, types) in enumerate(zip(stage_chs, stage_types)):
        stages.append(tnv.NextStage(
            in_chs, chs, types, stride=(1, 2, 2, 2)[s], sr_ratio=(8, 4, 2, 1)[s],
            mix_block_ratio=0.75, head_dim=cfg["head_dim"], drop_path=0.0, act_layer=relu,
        ))
        in_chs = chs[-1]
    model.stages = torch.nn.Sequential(*stages)
    model.norm = torch.nn.BatchNorm2d(in_chs)
    model.head = ClassifierHead(in_chs, cfg["num_classes"], pool_type="avg")
    model.num_features = in_chs
    return model


def randomize(model, seed: int = 0, stat_sizes=(64, 72), fp16_exact: bool = True):
    """Fan-in-scaled weights, random biases and BN affines, BN stats from data then perturbed.

    BN statistics come from one training-mode batch of 4 per size in `stat_sizes`; with
    `fp16_exact` every tensor is rounded to a float16-representable value.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: running stats = the batch's stats
        for name, m in model.named_modules():  # keep attention soft: float32-stable logits
            if name.endswith(("e_mhsa.q", "e_mhsa.k")):
                m.weight.mul_(0.3)
        model.train()
        for size in stat_sizes:
            model(torch.randn(4, 3, size, size, generator=g))
        model.eval()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.momentum = 0.1
                m.weight.copy_(1.0 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.add_(0.1 * torch.randn(c, generator=g))
                m.running_var.mul_(0.75 + 0.5 * torch.rand(c, generator=g))
        for t in model.state_dict().values():
            if fp16_exact and t.is_floating_point():
                t.copy_(t.half().float())


def main() -> None:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/timm_import.py
    from timm_import import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model = build_timm_model(timm)
    randomize(model)
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((2, 64, 64, 3)).astype(np.float16).astype(np.float32)
    x72 = rng.standard_normal((1, 72, 72, 3)).astype(np.float16).astype(np.float32)
    with torch.no_grad():
        logits64 = model(torch.from_numpy(x64.transpose(0, 3, 1, 2))).numpy()
        logits72 = model(torch.from_numpy(x72.transpose(0, 3, 1, 2))).numpy()
    arrays = {}
    for k, v in model.state_dict().items():
        v = v.numpy()
        arrays["sd/" + k] = v.astype(np.float16) if np.issubdtype(v.dtype, np.floating) else v
    meta = {"config": CONFIG, "timm_version": timm.__version__, "torch_version": torch.__version__}
    np.savez_compressed(
        OUT, **arrays, x64=x64.astype(np.float16), x72=x72.astype(np.float16),
        logits64=logits64, logits72=logits72, meta=np.array(json.dumps(meta)),
    )
    n = sum(v.numel() for v in model.parameters())
    print(f"wrote {OUT}: {os.path.getsize(OUT) / 1e6:.2f} MB, {n} params, "
          f"max|logits| {np.abs(logits64).max():.3f} / {np.abs(logits72).max():.3f}")


if __name__ == "__main__":
    main()
