r"""Next-ViT-S (nextvit_small) on ImageNet-1k with its paper's recipe (Li et al. 2022, sec. 4.1).

300 epochs, batch 2048, AdamW lr 5e-4 x batch/512 (= 2e-3), weight decay 0.1, cosine to 1e-5,
20 warm-up epochs, drop-path 0.1 for Next-ViT-S, label smoothing 0.1, DeiT's augmentations
(RandAugment, Mixup/CutMix, random erasing) without repeated augmentation.
configs/nextvit_s_hal.py is this file with hMHSA + cFFN. The hMHSA/cFFN paper trains its
variants with the backbone's recipe.

Arguments: ``runlocal`` (a smoke run of a few steps on a laptop CPU), ``data=demo`` (the
embedded digits instead of ImageNet), ``data_dir=DIR`` (where datasets are prepared).

  python train.py --config configs/nextvit_s.py --workdir runs/nextvit_s
  python train.py --config configs/nextvit_s.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    a = ch.parse_arg(arg, runlocal=False, data="", data_dir="")
    c = ch.base_config()
    c.model_name = "nextvit_small"
    c.model.hal = None  # the baseline (configs/nextvit_s_hal.py sets a HalConfig)
    c.model.drop_path_rate = 0.1
    c.model.remat = "none"  # or "block" / a jax.checkpoint_policies name (memory for compute)
    c.model.impl = "auto"

    c.input = ch.default_input_config()  # ImageNet-1k at 224, DeiT augmentations:
    c.input.data_dir = a.data_dir or None
    c.input.image_size = 224
    c.input.crop_pct = 0.875
    c.input.randaugment = "rand-m9-mstd0.5-inc1"
    c.input.random_erase = 0.25
    c.input.mixup = 0.8
    c.input.cutmix = 1.0
    c.input.mixup_switch_prob = 0.5
    c.input.label_smoothing = 0.1
    c.input.repeated_aug = 0

    c.global_batch_size = 2048
    c.total_epochs = 300.0
    c.optim.name = "adamw"
    c.optim.lr = 5e-4  # x batch / 512 = 2e-3
    c.optim.lr_base_batch_size = 512
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = None
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 20.0
    c.optim.warmup_init_lr = 1e-6
    c.optim.min_lr = 1e-5
    c.ema_decay = 0.0

    c.eval_every_epochs = 5.0
    c.checkpoint_every_steps = 1000
    c.keep_every_epochs = 50.0

    if a.data == "demo":
        ch.demo_data(c, a.data_dir)
        c.input.image_size = 64  # stride-32 pyramid: a 2x2 last stage
    elif a.data:
        raise ValueError(f"Unknown data={a.data!r}; use data=demo or leave it out.")
    if a.runlocal:
        ch.runlocal(c)
    return c
