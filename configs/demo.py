r"""The embedded demo: a small DeiT with hMHSA + cFFN on scikit-learn's digits (32x32 RGB).

Needs no download: the dataset ships with scikit-learn and is prepared (a few seconds) on first
use into ``input.data_dir``. docs/training.md renders what its 60 epochs reached in the last
recorded run (benchmarks/results/demo.json).
configs/demo_baseline.py is this file without hMHSA / cFFN.

Arguments: ``ci`` (or ``runlocal``): the 10-epoch variant; ``data_dir=DIR``.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/demo.py:ci --workdir /tmp/demo_ci      # 10-epoch CI variant
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    a = ch.parse_arg(arg, ci=False, runlocal=False, data_dir="", data="demo")
    if a.data != "demo":
        raise ValueError(f"configs/demo.py trains on the embedded digits only (data=demo), not data={a.data!r}")
    c = ch.base_config()
    c.model_name = "deit_tiny_hal"
    # A reduced DeiT: 4x4 patches of 8x8 pixels, width 96, 4 blocks of 4 heads (2 real + 2 hallucinated).
    c.model.update(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0,
                   drop_path_rate=0.0)
    # halluvit_jax.HalConfig's fields, at their defaults (docs/design.md sections 2-3).
    c.model.hal = dict(variant="ihh_chh", hal_init="identity", cffn=True, compact_ratio=2 / 3,
                       num_branches=2, factorize="w2", round_to=1, deploy=False)
    c.model.remat = "none"  # or "block" / a jax.checkpoint_policies name (memory for compute)
    c.model.impl = "auto"

    ch.demo_data(c, a.data, a.data_dir)  # the digits, prepared into data_dir if missing
    # Milder crops than the data default (0.35-1): a digit cropped to a third is often ambiguous.
    c.input.train_ops = "rrc(scale=0.6-1)|normalize"

    c.global_batch_size = 64
    c.total_epochs = 60.0
    c.optim.name = "adamw"
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.lr = 1e-3
    c.optim.lr_base_batch_size = 64
    c.optim.weight_decay = 0.05
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 2.0
    c.optim.warmup_init_lr = 1e-5
    c.optim.min_lr = 1e-5
    c.log_every_steps = 20
    c.eval_every_epochs = 15.0
    c.checkpoint_every_epochs = 15.0
    c.checkpoint_every_steps = None
    if a.ci or a.runlocal:
        c.total_epochs = 10.0
        c.eval_every_epochs = 10.0
        c.checkpoint_every_epochs = 5.0
    return c
