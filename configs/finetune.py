r"""Fine-tune a hal model from a converted checkpoint (docs/conversion.md): ``model=PRESET,init=DIR``.

``model`` names the preset whose model, data and augmentations are kept (``deit_s_hal``,
``deit_t_hal``, ``pvt_v2_b1_hal``, ``nextvit_s_hal``, their baselines ``deit_s``, ``deit_t``,
``pvt_v2_b1``, ``nextvit_s``, or ``demo``); ``init`` the converted
checkpoint dir (or a training workdir); ``epochs`` the schedule. Also ``runlocal``, ``data=demo``,
``data_dir=DIR`` as for the presets. The recipe below replaces the preset's 300 epochs from scratch:

- ImageNet presets: 30 epochs at the preset's batch, AdamW lr 1e-4 x batch/512 (a fifth of the
  from-scratch lr), 2 warm-up epochs from 1e-6 (3 for Next-ViT, whose scratch warm-up is 20),
  cosine to 1e-6, the preset's weight decay and drop-path, an evaluation every epoch.
- ``model=demo``: 10 epochs (230 steps of 64 images), lr 5e-4 (half the demo's), 1 warm-up
  epoch from 1e-5, cosine to 1e-5; ``init`` defaults to runs/demo_hal_converted.

  python -m halluvit_jax.convert timm --model deit_small --input deit_small.pth --output converted/deit_small
  python -m halluvit_jax.convert hal --from converted/deit_small --model deit_small_hal \
      --calib-config configs/deit_s_hal.py --output converted/deit_small_hal
  python train.py --config configs/finetune.py:model=deit_s_hal,init=converted/deit_small_hal --workdir runs/ft_deit_s_hal
  python train.py --config configs/finetune.py:model=demo,init=runs/demo_hal_converted --workdir runs/demo_hal_finetune
  python train.py --config configs/finetune.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax import config_helpers as ch

PRESETS = ("deit_s_hal", "deit_t_hal", "pvt_v2_b1_hal", "nextvit_s_hal", "deit_s", "deit_t", "pvt_v2_b1",
           "nextvit_s", "demo")


def get_config(arg=None):
    a = ch.parse_arg(arg, model="deit_s_hal", init="", epochs=0.0, runlocal=False, data="", data_dir="")
    if a.model not in PRESETS:
        raise ValueError(f"Unknown model={a.model!r}; fine-tune one of {list(PRESETS)}.")
    if a.model == "demo":
        c = ch.load_config("demo.py", f"data_dir={a.data_dir}" if a.data_dir else None, relative_to=__file__)
        c.init_from = a.init or "runs/demo_hal_converted"
        c.total_epochs = a.epochs or 10.0
        c.optim.lr = 5e-4
        c.optim.warmup_epochs = 1.0
        c.optim.warmup_init_lr = 1e-5
        c.optim.min_lr = 1e-5
        c.eval_every_epochs = c.total_epochs
        c.checkpoint_every_epochs = c.total_epochs
        return c

    if not a.init and not a.runlocal:
        raise ValueError(f"Fine-tuning needs init=<converted {a.model} dir or training workdir>, e.g. "
                         f"--config configs/finetune.py:model={a.model},init=converted/DIR.")
    c = ch.load_config(f"{a.model}.py", ch.preset_arg(a), relative_to=__file__)
    c.init_from = a.init
    if not a.runlocal:
        c.total_epochs = a.epochs or 30.0
        c.optim.warmup_epochs = 3.0 if a.model.startswith("nextvit") else 2.0
        c.eval_every_epochs = 1.0
        c.keep_every_epochs = None
    c.optim.lr = 1e-4
    c.optim.warmup_init_lr = 1e-6
    c.optim.min_lr = 1e-6
    return c
