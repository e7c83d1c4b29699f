r"""The demo's non-hal baseline: configs/demo.py's reduced DeiT without hMHSA / cFFN.

``deit_tiny`` at 32x32 (8x8 patches, width 96, 4 blocks, 4 heads of 24) on the embedded digits,
30 epochs (690 steps of 64 images), otherwise the demo recipe. It is the pretrained baseline that
``python -m halluvit_jax.convert hal`` turns into a ``deit_tiny_hal`` (see docs/conversion.md).
Same arguments as configs/demo.py.

  python train.py --config configs/demo_baseline.py --workdir runs/demo_baseline
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    c = ch.load_config("demo.py", arg, relative_to=__file__)
    c.model_name = "deit_tiny"
    c.model.hal = None  # MHSA + FFN
    c.total_epochs = 30.0 if c.total_epochs >= 30 else c.total_epochs
    c.eval_every_epochs = 10.0
    c.checkpoint_every_epochs = 10.0
    return c
