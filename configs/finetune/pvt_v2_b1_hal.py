r"""Fine-tune pvt_v2_b1_hal from a checkpoint converted from a pretrained pvt_v2_b1 (docs/conversion.md).

Short schedule instead of the 300-epoch from-scratch recipe: 30 epochs, the preset's
augmentations, global batch 1024, AdamW lr 1e-4 x batch/512 (a fifth of the from-scratch
lr), 2 warm-up epochs from 1e-6, cosine to 1e-6, weight decay 0.05, drop-path 0.1.

  python -m halluvit_jax.convert timm --model pvt_v2_b1 --input pvt_v2_b1.pth --output converted/pvt_v2_b1
  python -m halluvit_jax.convert hal --from converted/pvt_v2_b1 --model pvt_v2_b1_hal \
      --calib-config configs/pvt_v2_b1_hal.py --output converted/pvt_v2_b1_hal
  python train.py --config configs/finetune/pvt_v2_b1_hal.py:init=converted/pvt_v2_b1_hal --workdir runs/ft_pvt_v2_b1_hal
  python train.py --config configs/finetune/pvt_v2_b1_hal.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax.train import config_lib

EPOCHS = 30.0


def get_config(arg=None):
    a = config_lib.parse_arg(arg, init="", epochs=EPOCHS, runlocal=False, data="")
    if not a.init and not a.runlocal:
        raise ValueError(
            "Fine-tuning needs init=<converted pvt_v2_b1_hal dir or training workdir>, e.g. "
            "--config configs/finetune/pvt_v2_b1_hal.py:init=converted/pvt_v2_b1_hal."
        )
    c = config_lib.pvt_v2_recipe(config_lib.base_config())
    c.model_name = "pvt_v2_b1_hal"
    c.init_from = a.init
    c.total_epochs = a.epochs
    c.optim.lr = 1e-4
    c.optim.warmup_epochs = 2.0
    c.optim.warmup_init_lr = 1e-6
    c.optim.min_lr = 1e-6
    c.eval_every_epochs = 1.0
    c.keep_every_epochs = None
    return config_lib.apply_common_args(c, a, {"depths": (1, 1, 1, 1)})
