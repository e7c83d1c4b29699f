r"""deit_small on ImageNet-1k with the DeiT recipe (Touvron et al. 2021).

300 epochs, global batch 1024, AdamW lr 5e-4 x batch/512 (= 1e-3), weight decay 0.05, cosine
to 1e-5 after 5 warm-up epochs from 1e-6, drop-path 0.1, label smoothing 0.1, RandAugment
rand-m9-mstd0.5-inc1, Mixup 0.8 / CutMix 1.0, random erasing 0.25, repeated augmentation x3.
The hMHSA/cFFN paper trains its DeiT variants with this same recipe.

  python train.py --config configs/deit_s.py --workdir runs/deit_s
  python train.py --config configs/deit_s.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax.train import config_lib


def get_config(arg=None):
    return config_lib.preset(
        "deit_small", arg, recipe=config_lib.deit_recipe, runlocal_model={"depth": 2}
    )
