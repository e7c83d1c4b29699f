"""Save / load converted variables as an orbax checkpoint plus a JSON model card.

Layout of an output directory::

    out_dir/variables/        orbax (StandardCheckpointer) checkpoint of {'params', ['batch_stats']}
    out_dir/model_card.json   {'model': registry name, 'overrides': {...}, 'source': ..., 'input': ...}

Writes go to a temporary sibling directory that is renamed into place at the end, so a
failure never leaves a partial `out_dir` behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

CARD_NAME = "model_card.json"
VARIABLES_NAME = "variables"
_SKIPPED_COLLECTIONS = ("intermediates",)


def _host_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _host_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> str:
    """Absolute `out_dir`; raises FileExistsError if it is a file or a non-empty directory."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"Output {out_dir!r} exists and is not a directory.")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(
            f"Output directory {out_dir!r} is not empty; pass --overwrite (overwrite=True) or choose another."
        )
    return out_dir


def save_variables(
    out_dir: str | os.PathLike,
    variables: Mapping[str, Any],
    card: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> str:
    """Write `variables` (all collections but 'intermediates') and `card` under `out_dir`.

    Refuses an existing non-empty `out_dir` unless `overwrite`. Returns the absolute path.
    """
    import orbax.checkpoint as ocp

    out_dir = check_output_dir(out_dir, overwrite)
    if "params" not in variables:
        raise ValueError("save_variables() expects a variables dict with a 'params' collection.")
    tree = _host_numpy({k: v for k, v in variables.items() if k not in _SKIPPED_COLLECTIONS})
    card_text = json.dumps(dict(card), indent=2, sort_keys=True, default=str)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, VARIABLES_NAME), tree)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, CARD_NAME), "w") as f:
            f.write(card_text + "\n")
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore `(variables, card)` from a `save_variables` directory as host numpy arrays.

    `path` may be the output directory or its `variables/` subdirectory. `card` is `{}` when
    there is no model card.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.basename(path) == VARIABLES_NAME and not os.path.isdir(os.path.join(path, VARIABLES_NAME)):
        root, ckpt = os.path.dirname(path), path
    else:
        root, ckpt = path, os.path.join(path, VARIABLES_NAME)
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(
            f"No converted checkpoint at {path!r} (expected {ckpt!r}); write one with "
            "`python -m halluvit_jax.convert timm ...`."
        )
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(ckpt)
    variables = _host_numpy(variables)
    card_path = os.path.join(root, CARD_NAME)
    card: dict[str, Any] = {}
    if os.path.isfile(card_path):
        with open(card_path) as f:
            card = json.load(f)
    return variables, card
