r"""Next-ViT-S (nextvit_small) on ImageNet-1k with its paper's recipe (Li et al. 2022, sec. 4.1).

Next-ViT trains with DeiT's recipe and augmentations (configs/deit_s.py: AdamW, cosine to 1e-5,
RandAugment, Mixup/CutMix, random erasing, label smoothing 0.1, drop-path 0.1, 300 epochs) with
the changes below: batch 2048 (lr 5e-4 x batch/512 = 2e-3), weight decay 0.1, 20 warm-up epochs,
no repeated augmentation. configs/nextvit_s_hal.py is this file with hMHSA + cFFN. The
hMHSA/cFFN paper trains its variants with the backbone's recipe.

Arguments: ``runlocal`` (a smoke run of a few steps on a laptop CPU), ``data=demo`` (the
embedded digits instead of ImageNet), ``data_dir=DIR`` (where datasets are prepared).

  python train.py --config configs/nextvit_s.py --workdir runs/nextvit_s
  python train.py --config configs/nextvit_s.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    a = ch.parse_arg(arg, runlocal=False, data="", data_dir="")
    c = ch.load_config("deit_s.py", f"data_dir={a.data_dir}" if a.data_dir else None, relative_to=__file__)
    c.model_name = "nextvit_small"
    c.model.hal = None  # the baseline (configs/nextvit_s_hal.py sets a HalConfig)
    c.model.drop_path_rate = 0.1  # Next-ViT-S
    # Next-ViT's changes to DeiT's recipe:
    c.global_batch_size = 2048
    c.optim.weight_decay = 0.1
    c.optim.warmup_epochs = 20.0
    c.input.repeated_aug = 0

    if a.data:  # data=demo: the embedded digits, at 64x64 so the stride-32 pyramid ends 2x2
        ch.demo_data(c, a.data, a.data_dir).input.image_size = 64
    if a.runlocal:
        ch.runlocal(c)
    return c
