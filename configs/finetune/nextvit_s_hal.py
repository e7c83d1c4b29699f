r"""Fine-tune nextvit_small_hal from a checkpoint converted from a pretrained nextvit_small (docs/conversion.md).

Short schedule instead of the 300-epoch from-scratch recipe: 30 epochs, the preset's
augmentations, global batch 2048, AdamW lr 1e-4 x batch/512 (a fifth of the from-scratch
lr), 3 warm-up epochs from 1e-6, cosine to 1e-6, weight decay 0.1, drop-path 0.1.

  python -m halluvit_jax.convert timm --model nextvit_small --input nextvit_small.pth --output converted/nextvit_small
  python -m halluvit_jax.convert hal --from converted/nextvit_small --model nextvit_small_hal \
      --calib-config configs/nextvit_s_hal.py --output converted/nextvit_small_hal
  python train.py --config configs/finetune/nextvit_s_hal.py:init=converted/nextvit_small_hal --workdir runs/ft_nextvit_s_hal
  python train.py --config configs/finetune/nextvit_s_hal.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax.train import config_lib

EPOCHS = 30.0


def get_config(arg=None):
    a = config_lib.parse_arg(arg, init="", epochs=EPOCHS, runlocal=False, data="")
    if not a.init and not a.runlocal:
        raise ValueError(
            "Fine-tuning needs init=<converted nextvit_small_hal dir or training workdir>, e.g. "
            "--config configs/finetune/nextvit_s_hal.py:init=converted/nextvit_small_hal."
        )
    c = config_lib.nextvit_recipe(config_lib.base_config())
    c.model_name = "nextvit_small_hal"
    c.init_from = a.init
    c.total_epochs = a.epochs
    c.optim.lr = 1e-4
    c.optim.warmup_epochs = 3.0
    c.optim.warmup_init_lr = 1e-6
    c.optim.min_lr = 1e-6
    c.eval_every_epochs = 1.0
    c.keep_every_epochs = None
    return config_lib.apply_common_args(c, a, {})
