r"""DeiT-S (deit_small) on ImageNet-1k with the DeiT recipe (Touvron et al. 2021, Table 9).

The whole recipe is below; configs/deit_s_hal.py is this file with hMHSA + cFFN, and
configs/deit_t.py this file with the tiny model. The hMHSA/cFFN paper trains its DeiT variants
with this same recipe, and PVTv2 (configs/pvt_v2_b1.py) and Next-ViT (configs/nextvit_s.py)
train with it too, Next-ViT with four changes.

Arguments: ``runlocal`` (a smoke run of a few steps on a laptop CPU), ``data=demo`` (the
embedded digits instead of ImageNet), ``data_dir=DIR`` (where datasets are prepared).

  python train.py --config configs/deit_s.py --workdir runs/deit_s
  python train.py --config configs/deit_s.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    a = ch.parse_arg(arg, runlocal=False, data="", data_dir="")
    c = ch.base_config()
    c.model_name = "deit_small"
    c.model.hal = None  # the baseline: MHSA + FFN (configs/deit_s_hal.py sets a HalConfig)
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
    c.input.repeated_aug = 3  # DeiT's RASampler

    c.global_batch_size = 1024
    c.total_epochs = 300.0
    c.optim.name = "adamw"
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.lr = 5e-4  # x batch / 512 = 1e-3
    c.optim.lr_base_batch_size = 512
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = None
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 5.0
    c.optim.warmup_init_lr = 1e-6
    c.optim.min_lr = 1e-5
    c.ema_decay = 0.0  # the paper's numbers are without EMA

    c.eval_every_epochs = 5.0
    c.checkpoint_every_steps = 1000
    c.keep_every_epochs = 50.0

    if a.data:  # data=demo: the embedded digits at 32x32
        ch.demo_data(c, a.data, a.data_dir)
        c.model.img_size = c.input.image_size  # DeiT is built for one resolution
    if a.runlocal:
        ch.runlocal(c, depth=2)
    return c
