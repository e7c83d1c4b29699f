r"""Fine-tune the demo's ``deit_tiny_hal`` from a checkpoint converted from ``configs/demo_baseline.py``.

Short schedule: 10 epochs (230 steps of 64 images), AdamW lr 5e-4 (half the from-scratch demo
lr), 1 warm-up epoch from 1e-5, cosine to 1e-5, weight decay 0.05; the model and data are those
of ``configs/demo.py``. ``init`` names the converted checkpoint (docs/conversion.md):

  python train.py --config configs/demo_baseline.py --workdir runs/demo_baseline
  python -m halluvit_jax.convert hal --from runs/demo_baseline --model deit_tiny_hal \
      --calib-config configs/demo.py --output runs/demo_hal_converted
  python train.py --config configs/finetune/demo_hal.py:init=runs/demo_hal_converted \
      --workdir runs/demo_hal_finetune
"""

import importlib.util
import os


def _load(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
    spec = importlib.util.spec_from_file_location(f"_halluvit_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    config_lib = _load("demo.py").config_lib
    a = config_lib.parse_arg(arg, init="runs/demo_hal_converted", epochs=10.0, data_dir="")
    c = _load("demo.py").get_config(f"data_dir={a.data_dir}" if a.data_dir else None)
    c.init_from = a.init
    c.total_epochs = a.epochs
    c.optim.lr = 5e-4
    c.optim.warmup_epochs = 1.0
    c.optim.warmup_init_lr = 1e-5
    c.optim.min_lr = 1e-5
    c.eval_every_epochs = a.epochs
    c.checkpoint_every_epochs = a.epochs
    return c
