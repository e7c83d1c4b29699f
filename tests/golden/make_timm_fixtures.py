"""Regenerate the timm parity fixtures `tests/golden/{deit,pvt_v2}.npz`.

    python tests/golden/make_timm_fixtures.py        # needs torch + timm (pip install .[timm])

Builds reduced-size real timm models (random init, fixed torch seed; nothing is downloaded),
runs them in eval mode on fixed random images and stores, per family:

- `sd/<timm key>`: the state_dict (float32),
- `x`: the input, NHWC float32 (timm sees its NCHW transpose), `logits`: timm's output,
- `config/<field>`: the overrides that build the same model from our registry.

The DeiT file also holds timm's logits at a second resolution (`x_96`, `logits_96`, with the
checkpoint's position embedding resampled by timm's `checkpoint_filter_fn`) and reference
outputs of `timm.layers.resample_abs_pos_embed` (`posemb_*`). Each file stays < 1.5 MB.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

# timm model -> (our registry name, timm kwargs, our overrides)
DEIT = dict(
    timm_name="deit_tiny_patch16_224",
    ours="deit_tiny",
    timm_kwargs=dict(img_size=64, embed_dim=48, depth=2, num_heads=3, num_classes=10),
    overrides=dict(img_size=64, embed_dim=48, depth=2, num_heads=3, num_classes=10),
)
PVT = dict(
    timm_name="pvt_v2_b0",
    ours="pvt_v2_b0",
    timm_kwargs=dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), num_classes=10),
    overrides=dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), num_classes=10),
)


def _run(model, x_nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def _state_dict(model) -> dict[str, np.ndarray]:
    return {f"sd/{k}": v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def _perturb(model, seed: int) -> None:
    """Move LayerNorm affines and biases off their 1/0 init so the test sees their mapping."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or (p.ndim == 1 and "norm" in name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def make_deit(timm, out: str) -> None:
    import torch

    torch.manual_seed(0)
    model = timm.create_model(DEIT["timm_name"], pretrained=False, **DEIT["timm_kwargs"]).eval()
    _perturb(model, 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
    arrays = _state_dict(model)
    arrays["x"], arrays["logits"] = x, _run(model, x)

    # Same checkpoint at 96x96: timm resamples pos_embed 4x4 -> 6x6 when loading it.
    from timm.models.vision_transformer import checkpoint_filter_fn

    kwargs96 = dict(DEIT["timm_kwargs"], img_size=96)
    model96 = timm.create_model(DEIT["timm_name"], pretrained=False, **kwargs96).eval()
    model96.load_state_dict(checkpoint_filter_fn(model.state_dict(), model96))
    x96 = rng.standard_normal((2, 96, 96, 3)).astype(np.float32)
    arrays["x_96"], arrays["logits_96"] = x96, _run(model96, x96)

    # resample_abs_pos_embed reference: 14x14 (+cls) -> up to 24x24 and down to 10x10 / 7x9.
    from timm.layers import resample_abs_pos_embed

    pos = torch.from_numpy(rng.standard_normal((1, 1 + 14 * 14, 8)).astype(np.float32))
    arrays["posemb_in"] = pos.numpy()
    for h, w in ((24, 24), (10, 10), (7, 9)):
        arrays[f"posemb_{h}x{w}"] = resample_abs_pos_embed(pos, [h, w], num_prefix_tokens=1).numpy()
    _save(out, arrays, DEIT)


def make_pvt(timm, out: str) -> None:
    import torch

    torch.manual_seed(0)
    model = timm.create_model(PVT["timm_name"], pretrained=False, **PVT["timm_kwargs"]).eval()
    _perturb(model, 1)
    rng = np.random.default_rng(1)
    # 72 = not a multiple of 32: exercises floor arithmetic of the strided / SR convs.
    x = rng.standard_normal((2, 72, 64, 3)).astype(np.float32)
    arrays = _state_dict(model)
    arrays["x"], arrays["logits"] = x, _run(model, x)
    _save(out, arrays, PVT)


def _save(path: str, arrays: dict[str, np.ndarray], spec: dict) -> None:
    meta = {"timm_name": spec["timm_name"], "ours": spec["ours"], "overrides": spec["overrides"]}
    arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(path, **arrays)
    size = os.path.getsize(path)
    print(f"wrote {path}: {size / 1e6:.2f} MB, {len(arrays)} arrays")
    if size > 1.5e6:
        raise SystemExit(f"{path} is larger than 1.5 MB; shrink the model.")


def main() -> None:
    sys.path.insert(0, os.path.dirname(HERE))  # tests/timm_import.py
    from timm_import import import_timm

    timm = import_timm()
    make_deit(timm, os.path.join(HERE, "deit.npz"))
    make_pvt(timm, os.path.join(HERE, "pvt_v2.npz"))


if __name__ == "__main__":
    main()
