r"""The paper's ablations on ImageNet-1k: DeiT-T/S + hMHSA/cFFN with the DeiT recipe (300 epochs).

``ablation=NAME`` as in ``halluvit_jax.analysis.ablations.ABLATIONS``; ``size=tiny|small`` the DeiT
size (default tiny); ``seed=S``; plus the presets' ``runlocal`` / ``data=demo`` / ``data_dir``.
The baseline keeps the hal model's head count (``deit_tiny_hal`` with ``hal=None``), so that
only hMHSA/cFFN differ.

  python train.py --config configs/ablations/imagenet.py:ablation=copy --workdir runs/abl_in/copy
  python train.py --config configs/ablations/imagenet.py:ablation=w1,size=small --workdir runs/abl_in/s_w1
"""

from halluvit_jax import config_helpers as ch
from halluvit_jax.analysis.ablations import ablate

PRESET = {"tiny": "../deit_t_hal.py", "small": "../deit_s_hal.py"}


def get_config(arg=None):
    a = ch.parse_arg(arg, ablation="ihh_chh", size="tiny", seed=0, runlocal=False, data="", data_dir="")
    if a.size not in PRESET:
        raise ValueError(f"Unknown size={a.size!r}; use size=tiny or size=small.")
    c = ch.load_config(PRESET[a.size], ch.preset_arg(a), relative_to=__file__)
    ablate(c, a.ablation)
    c.seed = a.seed
    return c
