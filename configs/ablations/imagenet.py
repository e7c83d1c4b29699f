r"""The paper's ablations on ImageNet-1k: DeiT-T/S + hMHSA/cFFN with the DeiT recipe (300 epochs).

``ablation=NAME`` as in :data:`halluvit_jax.analysis.ablations.ABLATIONS`; ``size=tiny|small``
the DeiT size (default tiny); ``seed=S``; plus the presets' ``runlocal`` / ``data=demo``.

  python train.py --config configs/ablations/imagenet.py:ablation=copy --workdir runs/abl_in/copy
  python train.py --config configs/ablations/imagenet.py:ablation=w1,size=small --workdir runs/abl_in/s_w1
"""

import ml_collections

from halluvit_jax.analysis.ablations import ablation_model
from halluvit_jax.train import config_lib

_HAL = {"tiny": {"embed_dim": 192, "num_heads": 4}, "small": {"embed_dim": 384, "num_heads": 6}}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, ablation="ihh_chh", size="tiny", seed=0, runlocal=False, data="")
    if a.size not in _HAL:
        raise ValueError(f"Unknown size={a.size!r}; use size=tiny or size=small.")
    c = config_lib.deit_recipe(config_lib.base_config())
    c.model_name = f"deit_{a.size}_hal"
    c = config_lib.apply_common_args(c, a, {"depth": 2})
    # The baseline keeps the hal model's head count, so that only hMHSA/cFFN differ.
    model = {**_HAL[a.size], **c.model.to_dict()}
    name, model = ablation_model(c.model_name, model, a.ablation)
    c.model_name = name
    c.model = ml_collections.ConfigDict(model)
    c.seed = a.seed
    return c
