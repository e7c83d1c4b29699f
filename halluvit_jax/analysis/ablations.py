"""The paper's ablations (Tables 2, 3, 5, 6, 7) as named model settings for `configs/ablations/`.

Each setting maps to a model name and overrides of its dataclass fields; the default hal
setting is ``ihh_chh`` (IHH then CHH, cFFN with t = 2/3, r = 2, W2 factorized).

==============  ========================================================  ===========
setting         what changes (everything else as ``ihh_chh``)             paper table
==============  ========================================================  ===========
baseline        the plain model (MHSA + FFN), same depth/width/heads       1, 4
ihh_chh         the default hMHSA + cFFN                                    all
copy            hallucinated heads are copies of the real heads            2
ihh             IHH only                                                    2
chh             CHH only                                                    2
chh_ihh         CHH then IHH                                                3
t1_2 / t3_4     cFFN compact ratio t = 1/2 / 3/4 (default 2/3)              7
plain_ffn       hMHSA + a plain FFN whose ratio m matches cFFN(t=2/3) FLOPs 5
r1 / r3         1 / 3 re-parameterized branches (default 2)                 5
w1              factorize W1 (input-to-hidden) instead of W2                6
==============  ========================================================  ===========
"""

from __future__ import annotations

from typing import Any

from halluvit_jax.layers.mlp import compact_width

ABLATIONS: dict[str, dict[str, Any]] = {
    "baseline": {"hal": False},
    "ihh_chh": {},
    "copy": {"hal_variant": "copy"},
    "ihh": {"hal_variant": "ihh"},
    "chh": {"hal_variant": "chh"},
    "chh_ihh": {"hal_variant": "chh_ihh"},
    "t1_2": {"compact_ratio": 1.0 / 2.0},
    "t3_4": {"compact_ratio": 3.0 / 4.0},
    "plain_ffn": {"cffn": False},  # mlp_ratio set by equal_flops_mlp_ratio
    "r1": {"num_branches": 1},
    "r3": {"num_branches": 3},
    "w1": {"factorize": "w1"},
}


def equal_flops_mlp_ratio(dim: int, mlp_ratio: float, compact_ratio: float = 2.0 / 3.0) -> float:
    """Ratio m' of a plain FFN with the MACs of a W2-factorized cFFN (deploy form).

    cFFN: ``C*mC + mC*c' + c'*C`` with ``c' = compact_width(mC, C, t)``; plain: ``2*C*m'C``.
    The returned ratio gives ``int(dim * m')`` = the rounded equal-cost hidden width.
    """
    hidden = int(dim * mlp_ratio)
    width = compact_width(hidden, dim, compact_ratio)
    macs = dim * hidden + width * (hidden + dim)
    plain_hidden = round(macs / (2 * dim))
    return (plain_hidden + 0.5) / dim  # +0.5: int() in the model floors to plain_hidden


def ablation_model(model_name: str, model: dict[str, Any], ablation: str) -> tuple[str, dict[str, Any]]:
    """(model name, model overrides) of ``ablation`` applied to a hal preset's model."""
    if ablation not in ABLATIONS:
        raise ValueError(f"Unknown ablation {ablation!r}; choose one of {sorted(ABLATIONS)}.")
    if not model_name.endswith("_hal"):
        raise ValueError(f"Ablations start from a *_hal model, got {model_name!r}.")
    change = dict(ABLATIONS[ablation])
    model = dict(model)
    if change.pop("hal", True) is False:
        return model_name[: -len("_hal")], model
    if change.get("cffn") is False:
        model["mlp_ratio"] = equal_flops_mlp_ratio(
            int(model["embed_dim"]), float(model.get("mlp_ratio", 4.0)),
            float(model.get("compact_ratio", 2.0 / 3.0)),
        )
    model.update(change)
    return model_name, model
