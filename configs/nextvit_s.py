r"""nextvit_small on ImageNet-1k: Next-ViT-S (Li et al. 2022), trained with its paper's recipe.

See `halluvit_jax.train.config_lib.nextvit_recipe` for the exact recipe and its source; the hMHSA/cFFN
paper trains its variants with the recipe of the backbone.

  python train.py --config configs/nextvit_s.py --workdir runs/nextvit_s
  python train.py --config configs/nextvit_s.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax.train import config_lib


def get_config(arg=None):
    return config_lib.preset(
        "nextvit_small", arg, recipe=config_lib.nextvit_recipe, runlocal_model={}
    )
