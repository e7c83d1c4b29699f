r"""The demo's non-hal baseline: the reduced DeiT of ``configs/demo.py`` without hMHSA / cFFN.

``deit_tiny`` at 32x32 (8x8 patches, width 96, 4 blocks, 4 heads of 24) on the embedded digits,
30 epochs (690 steps of 64 images), otherwise the demo recipe. It is the pretrained baseline that
``python -m halluvit_jax.convert hal`` turns into a ``deit_tiny_hal`` (see docs/conversion.md).

  python train.py --config configs/demo_baseline.py --workdir runs/demo_baseline
"""

import importlib.util
import os


def _demo_config(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("_halluvit_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    c = _demo_config(arg)
    c.model_name = "deit_tiny"
    c.total_epochs = 30.0 if c.total_epochs >= 30 else c.total_epochs
    c.eval_every_epochs = 10.0
    c.checkpoint_every_epochs = 10.0
    return c
