"""The paper's ablations (Tables 2, 3, 5, 6, 7), each a change of the default ``HalConfig``,
applied to a training config: ``configs/ablations/*.py`` and ``scripts/run_ablations.py``
(docs/ablations.md).

:data:`ABLATIONS` names the ``HalConfig`` fields each one changes; :func:`ablate` applies one to
a hal config (``plain_ffn`` also sizes the FFN to the cFFN's cost,
:func:`equal_flops_mlp_ratio`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from halluvit_jax.layers.config import HalConfig
from halluvit_jax.layers.mlp import compact_width
from halluvit_jax.models import create_model

#: name -> the HalConfig fields it changes (None: the baseline, hal=None: MHSA + FFN with the
#: hal preset's depth, widths and head counts). See docs/ablations.md.
ABLATIONS: dict[str, dict[str, Any] | None] = {
    "baseline": None,  # Tables 1, 4
    "ihh_chh": {},  # the default: IHH then CHH, cFFN t = 2/3, r = 2, W2 factorized
    "copy": {"variant": "copy"},  # Table 2: hallucinated heads are copies of the real ones
    "ihh": {"variant": "ihh"},  # Table 2
    "chh": {"variant": "chh"},  # Table 2
    "chh_ihh": {"variant": "chh_ihh"},  # Table 3
    "t1_2": {"compact_ratio": 1.0 / 2.0},  # Table 7
    "t3_4": {"compact_ratio": 3.0 / 4.0},  # Table 7
    "plain_ffn": {"cffn": False},  # Table 5: hMHSA + a plain FFN of the cFFN's cost (see ablate)
    "r1": {"num_branches": 1},  # Table 5
    "r3": {"num_branches": 3},  # Table 5
    "w1": {"factorize": "w1"},  # Table 6: factorize W1 instead of W2
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


def ablate(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """``c`` (a hal config) with the ablation ``name``: ``c.model.hal`` replaced by
    ``dataclasses.replace(hal, **ABLATIONS[name])`` (None for the baseline).

    ``plain_ffn`` also widens or narrows the FFNs to the cFFN's cost (Table 5) where the model
    states its FFN ratio per width (``embed_dim``/``mlp_ratio``, or per stage
    ``embed_dims``/``mlp_ratios``); elsewhere (Next-ViT) the FFNs keep the preset's ratio.
    """
    if name not in ABLATIONS:
        raise ValueError(f"Unknown ablation {name!r}; choose one of {sorted(ABLATIONS)}.")
    hal = HalConfig.make(c.model.get("hal", True))
    if hal is None:
        raise ValueError(f"Ablations start from a hal config, got {c.model_name!r} with model.hal=None.")
    change = ABLATIONS[name]
    c.model.hal = None if change is None else dataclasses.replace(hal, **change).to_dict()
    if name == "plain_ffn":
        model = create_model(c.model_name, **c.model)
        if hasattr(model, "embed_dim") and hasattr(model, "mlp_ratio"):
            c.model.mlp_ratio = equal_flops_mlp_ratio(model.embed_dim, model.mlp_ratio, hal.compact_ratio)
        elif hasattr(model, "embed_dims") and hasattr(model, "mlp_ratios"):
            c.model.mlp_ratios = tuple(equal_flops_mlp_ratio(d, m, hal.compact_ratio)
                                       for d, m in zip(model.embed_dims, model.mlp_ratios))
    return c
