"""Orbax checkpoints of the train state and the input iterator, and `init_from` loading.

Layout of a workdir::

    workdir/checkpoints/<step>/state   train state (sharded arrays; restores onto any mesh)
    workdir/checkpoints/<step>/data    grain iterator state, one JSON per process
    workdir/checkpoints/<step>/meta    {'step', 'process_count'}

Only finalized steps are listed by orbax (it writes to a temporary directory and renames), so a
process killed mid-save never leaves a half checkpoint that resume would pick up.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger("halluvit_jax.train")


def create_checkpoint_manager(
    directory: str, *, max_to_keep: int = 3, keep_period: int | None = None, async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """Keeps the last ``max_to_keep`` steps plus every multiple of ``keep_period`` (snapshots)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        keep_period=keep_period or None,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any | None) -> None:
    """Saves (asynchronously if the manager is async) the train state and the iterator state."""
    import grain

    items = {
        "state": ocp.args.StandardSave(state),
        "meta": ocp.args.JsonSave({"step": int(step), "process_count": jax.process_count()}),
    }
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any | None
) -> Any:
    """Restores the train state onto ``abstract_state``'s shardings (any mesh); the iterator too
    when the checkpoint was written with the same process count (else it restarts with a warning)."""
    import grain

    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        if meta.get("process_count") == jax.process_count():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        else:
            logger.warning(
                "Checkpoint %d was written by %s processes, this run has %d: the input pipeline "
                "restarts from its beginning (the train state is restored exactly).",
                step, meta.get("process_count"), jax.process_count(),
            )
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
    """Resolves a workdir, a checkpoint root or a step directory to (checkpoint root, step)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.isdir(os.path.join(path, "state")):  # a step directory
        root, name = os.path.split(path)
        return root, int(name)
    steps = ocp.utils.checkpoint_steps(path) if os.path.isdir(path) else []
    if not steps:
        raise FileNotFoundError(
            f"No finalized checkpoint in {path}; pass a training workdir, its checkpoints/ "
            "directory, a step directory, or a converted checkpoint (with model_card.json)."
        )
    if step is None:
        return path, max(steps)
    if step not in steps:
        raise FileNotFoundError(f"Step {step} is not in {path} (have {sorted(steps)}).")
    return path, step


def load_state_as_numpy(root: str, step: int) -> dict[str, Any]:
    """The 'state' item of a training checkpoint as a nested dict of host numpy arrays.

    Needs no template (the optimizer of the run that wrote it is irrelevant), so it serves
    evaluation and ``init_from``: ``{'step', 'params', 'batch_stats', 'opt_state', 'ema_params'}``.
    """
    path = os.path.join(root, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    if hasattr(tree, "tree"):
        tree = tree.tree
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
        is_leaf=lambda x: not isinstance(x, (dict, list, tuple)),
    )
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def is_converted_checkpoint(path: str) -> bool:
    """A converted/exported variables checkpoint (``path/variables`` + ``path/model_card.json``)."""
    return os.path.isfile(os.path.join(path, "model_card.json"))


def state_variables(state: dict[str, Any], *, use_ema: bool, where: str,
                    error: type[Exception] = ValueError) -> dict[str, Any]:
    """``{'params', 'batch_stats'?}`` of a loaded train state; the EMA weights if ``use_ema``
    (raising ``error`` naming ``where`` when the checkpoint has none)."""
    if use_ema and not state.get("ema_params"):
        raise error(f"Checkpoint {where} has no EMA weights; drop --ema.")
    variables = {"params": state["ema_params"] if use_ema else state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return variables


def load_pretrained_variables(path: str, *, use_ema: bool = False) -> dict[str, Any]:
    """Variables {'params', 'batch_stats'?} from a converted checkpoint or a training checkpoint."""
    if is_converted_checkpoint(path):
        from halluvit_jax.convert.io import load_variables

        variables, card = load_variables(path)
        logger.info("Loaded converted checkpoint %s (%s).", path, card.get("model", "?") if isinstance(card, dict) else card)
        return {k: jax.device_get(v) for k, v in dict(variables).items()}
    root, step = find_checkpoint(path)
    state = load_state_as_numpy(root, step)
    params = state["ema_params"] if use_ema and state.get("ema_params") else state["params"]
    out = {"params": params}
    if state.get("batch_stats"):
        out["batch_stats"] = state["batch_stats"]
    logger.info("Loaded step %d of training checkpoint %s.", step, root)
    return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def resample_pos_embed_like(pos: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Resamples a `[1, P + H*W, C]` position embedding to the target token count (square grids)."""
    from halluvit_jax.models.deit import resample_pos_embed

    n_old, n_new = pos.shape[1], target_shape[1]
    for prefix in (1, 0, 2):
        so, sn = np.sqrt(n_old - prefix), np.sqrt(n_new - prefix)
        if so == int(so) and sn == int(sn) and so > 0:
            return resample_pos_embed(pos, (int(sn), int(sn)), num_prefix_tokens=prefix)
    raise ValueError(f"Cannot resample pos_embed {pos.shape} to {target_shape}: grids are not square.")


def merge_pretrained(
    init_vars: dict[str, Any], loaded: dict[str, Any], *, reinit_regex: str | None = None
) -> dict[str, Any]:
    """Copies ``loaded`` into ``init_vars`` (numpy trees) where paths match.

    Position embeddings of another resolution are resampled; leaves of another shape (a new
    classifier head) and paths matching ``reinit_regex`` keep their fresh initialization.
    """
    import re

    out = {}
    for collection, tree in init_vars.items():
        flat_init = _flatten(tree)
        flat_loaded = _flatten(loaded.get(collection, {}))
        merged, kept = {}, []
        for path, init in flat_init.items():
            src = flat_loaded.get(path)
            if src is None or (reinit_regex and re.search(reinit_regex, path)):
                kept.append(path)
                merged[path] = init
                continue
            src = np.asarray(src)
            if src.shape != tuple(init.shape) and path.endswith("pos_embed"):
                logger.info("Resampling %s from %s to %s.", path, src.shape, tuple(init.shape))
                src = resample_pos_embed_like(src, tuple(init.shape))
            if src.shape != tuple(init.shape):
                logger.warning("Not loading %s: shape %s != %s (kept fresh).", path, src.shape, tuple(init.shape))
                kept.append(path)
                merged[path] = init
                continue
            merged[path] = src.astype(np.asarray(init).dtype)
        unused = sorted(set(flat_loaded) - set(flat_init))
        if unused:
            logger.warning("Unused %s entries of the loaded checkpoint: %s", collection, unused[:10])
        if kept:
            logger.info("Freshly initialized %s entries: %s", collection, kept[:10])
        out[collection] = _unflatten(merged)
    return out
