r"""PVTv2-b1 (pvt_v2_b1) on ImageNet-1k with its paper's recipe (Wang et al. 2022, sec. 4.1).

The PVT repository trains with DeiT's main.py, so the recipe is configs/deit_s.py's, unchanged:
300 epochs, 8 GPUs x 128 = batch 1024, AdamW lr 5e-4 x batch/512 (= 1e-3), weight decay 0.05,
cosine to 1e-5 after 5 warm-up epochs, drop-path 0.1 for b1, no gradient clipping, DeiT's
augmentations. configs/pvt_v2_b1_hal.py is this file with hMHSA + cFFN. The hMHSA/cFFN paper
trains its variants with the backbone's recipe.

Arguments: ``runlocal`` (a smoke run of a few steps on a laptop CPU), ``data=demo`` (the
embedded digits instead of ImageNet), ``data_dir=DIR`` (where datasets are prepared).

  python train.py --config configs/pvt_v2_b1.py --workdir runs/pvt_v2_b1
  python train.py --config configs/pvt_v2_b1.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    a = ch.parse_arg(arg, runlocal=False, data="", data_dir="")
    c = ch.load_config("deit_s.py", f"data_dir={a.data_dir}" if a.data_dir else None, relative_to=__file__)
    c.model_name = "pvt_v2_b1"
    c.model.hal = None  # the baseline (configs/pvt_v2_b1_hal.py sets a HalConfig)
    c.model.drop_path_rate = 0.1  # b1

    if a.data:  # data=demo: the embedded digits, at 64x64 so the stride-32 pyramid ends 2x2
        ch.demo_data(c, a.data, a.data_dir).input.image_size = 64
    if a.runlocal:
        ch.runlocal(c, depths=(1, 1, 1, 1))
    return c
