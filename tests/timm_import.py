"""Import timm on machines where torchvision's compiled ops do not load.

timm imports torchvision at import time. A PyPI torchvision wheel built for a different torch
(e.g. beside the CPU build torch 2.13.0 here) fails with "operator torchvision::nms does not
exist" because its C extension cannot register the ops. None of the timm models used here needs
those ops, so we define the two operator schemas torchvision's Python side looks up before
importing it. With a matching torch/torchvision pair this is a no-op.
"""

from __future__ import annotations

import importlib
import sys


def import_timm():
    """Return the `timm` module, working around a mismatched torchvision. Raises ImportError."""
    import torch  # noqa: F401  (ImportError propagates: torch is an optional extra)

    try:
        return importlib.import_module("timm")
    except (RuntimeError, ImportError) as err:  # torchvision's C ops failed to register
        if "torchvision" not in str(err) and "nms" not in str(err):
            raise

    for name in [m for m in sys.modules if m.startswith(("torchvision", "timm"))]:
        del sys.modules[name]
    _define_torchvision_schemas()
    return importlib.import_module("timm")


_LIB = None


def _define_torchvision_schemas() -> None:
    global _LIB
    import torch

    if _LIB is not None:
        return
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
