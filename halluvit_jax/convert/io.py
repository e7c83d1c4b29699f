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
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from halluvit_jax.loading import read_variables_dir

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
        normal_modes(tmp)
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        _remove_abandoned(tmp)
        raise
    return out_dir


def _remove_abandoned(path: str, *, quiet_s: float = 0.3, timeout_s: float = 10.0) -> None:
    """Removes a failed save's temporary directory. When orbax's save fails, its background
    threads (metadata, commit markers) may still write into the directory after the error
    reached us, so it is removed until it has stayed absent for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(quiet_s)
        if not os.path.exists(path) or time.monotonic() > deadline:
            return


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore `(variables, card)` from a `save_variables` directory as host numpy arrays.

    `path` may be the output directory or its `variables/` subdirectory. `card` is `{}` when
    there is no model card. (The reading lives in :mod:`halluvit_jax.loading`, shared with the
    trainer and evaluation.)
    """
    return read_variables_dir(path)


def normal_modes(path: str | os.PathLike) -> None:
    """Gives a written tree the modes of ordinary files (0666 / 0777 minus the umask):
    `tempfile.mkdtemp` makes 0700 directories, which a deploy export must not keep."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)
