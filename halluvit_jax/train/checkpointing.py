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
import re
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from halluvit_jax import loading
from halluvit_jax.models import resample_pos_embed

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
    items = {
        "state": ocp.args.StandardSave(state),
        "meta": ocp.args.JsonSave({"step": int(step), "process_count": jax.process_count()}),
    }
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def all_finite(tree: Any) -> jax.Array:
    """One fused reduction: True iff every floating leaf of ``tree`` is finite (jit-able)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any | None
) -> Any:
    """Restores the train state onto ``abstract_state``'s shardings (any mesh); the iterator too
    when the checkpoint was written with the same process count (else it restarts with a warning).

    Verifies first that the checkpoint's structure and shapes are the model's (else one
    :class:`~halluvit_jax.loading.CheckpointMismatchError` line), and after reading that every
    value is finite (else :class:`~halluvit_jax.loading.NonFiniteCheckpointError`). Unreadable
    files raise :class:`~halluvit_jax.loading.CorruptCheckpointError`.
    """
    root = os.fspath(manager.directory)
    saved = loading.read_state_metadata(root, step)
    loading.verify_tree(
        abstract_state, saved, what=f"checkpoint step {step} in {root}",
        fix="resume with the config that wrote it (see config.json next to checkpoints/) or use a new --workdir",
    )
    try:
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
        with loading.quiet_orbax():
            state = manager.restore(step, args=ocp.args.Composite(**items))["state"]
    except Exception as err:  # noqa: BLE001 - orbax / tensorstore raise many types for damaged files
        raise loading.CorruptCheckpointError(
            f"checkpoint step {step} in {root} is unreadable (truncated or corrupted? {loading._describe(err)})"
        ) from None
    if not bool(jax.device_get(jax.jit(all_finite)(state))):
        bad = loading.first_non_finite(jax.device_get(state)) if jax.process_count() == 1 else "some leaf"
        raise loading.NonFiniteCheckpointError(
            f"checkpoint step {step} in {root} holds non-finite values ({bad}); it cannot be resumed from: "
            f"move {root}/{step} away to resume from the step before it, or use a new --workdir"
        )
    return state


def set_aside(root: str, step: int) -> str:
    """Renames a broken step directory out of orbax's view (``<step>.unreadable``); never deletes."""
    src = os.path.join(root, str(step))
    dst, i = f"{src}.unreadable", 1
    while os.path.exists(dst):
        i += 1
        dst = f"{src}.unreadable{i}"
    if jax.process_index() == 0:
        os.rename(src, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set_aside_{step}")
    return dst


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None) -> Any | None:
    """The newest intact checkpoint's train state (see :func:`restore`), or None if there is none.

    An unreadable (partial, damaged) newest step is reported in one line, renamed to
    ``<step>.unreadable`` (kept for inspection, never deleted) and the next older step is tried.
    A mismatching or non-finite checkpoint is an error, not skipped.
    """
    root = os.fspath(manager.directory)
    while (step := manager.latest_step()) is not None:
        try:
            state = restore(manager, step, abstract_state, data_iter)
        except loading.CorruptCheckpointError as err:
            moved = set_aside(root, step)
            logger.warning("%s; skipping it (kept as %s) and trying the previous step.", err, moved)
            manager.reload()
            continue
        logger.info("Resuming from %s step %d.", root, step)
        return state
    return None


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
    """Resolves a workdir, a checkpoint root or a step directory to (checkpoint root, step)."""
    return loading.find_step(path, step)


def load_state_as_numpy(root: str, step: int) -> dict[str, Any]:
    """The 'state' item of a training checkpoint as a nested dict of host numpy arrays."""
    return loading.read_state(root, step)


def load_pretrained_variables(path: str) -> dict[str, Any]:
    """Variables {'params', 'batch_stats'?} (host numpy) of a converted checkpoint or a training
    checkpoint (its latest step), for ``init_from``; non-finite values are refused."""
    if loading.is_converted(path):
        variables, card = loading.read_variables_dir(path)
        logger.info("Loaded converted checkpoint %s (%s).", path, card.get("model", "?"))
        where = f"converted checkpoint {path}"
    else:
        root, step = loading.find_step(path)
        state = loading.read_state(root, step)
        variables = {"params": state["params"]}
        if state.get("batch_stats"):
            variables["batch_stats"] = state["batch_stats"]
        logger.info("Loaded step %d of training checkpoint %s.", step, root)
        where = f"checkpoint step {step} in {root}"
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    bad = loading.first_non_finite(variables)
    if bad:
        raise loading.NonFiniteCheckpointError(f"init_from {where} holds non-finite values ({bad})")
    return variables


def resample_pos_embed_like(pos: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Resamples a `[1, P + H*W, C]` position embedding to the target token count (square grids)."""
    n_old, n_new = pos.shape[1], target_shape[1]
    for prefix in (1, 0, 2):
        so, sn = np.sqrt(n_old - prefix), np.sqrt(n_new - prefix)
        if so == int(so) and sn == int(sn) and so > 0:
            return resample_pos_embed(pos, (int(sn), int(sn)), num_prefix_tokens=prefix)
    raise ValueError(f"Cannot resample pos_embed {pos.shape} to {target_shape}: grids are not square.")


#: The classifier head: a new one (another class count, or ``init_reinit_regex``) starts at zero.
HEAD_REGEX = r"^head/"


def _form_mismatch(missing: list[str], flat_loaded: dict[str, Any], where: str) -> None:
    """One line when the checkpoint's cFFN is folded and the model's in training form, or back."""
    for path in missing:
        for have, want, fix in (("kernel", "branch_kernel", "train it folded: model.hal.deploy=True"),
                                ("branch_kernel", "kernel", "train it in training form: model.hal.deploy=False")):
            if path.endswith("/" + want) and path[: -len(want)] + have in flat_loaded:
                form = "folded (a deploy export)" if have == "kernel" else "in training form"
                raise loading.CheckpointMismatchError(
                    f"init_from {where} holds the cFFN {form} but the model does not ({path}); {fix} "
                    "(configs/transfer.py sets it from the checkpoint)")


def merge_pretrained(
    init_vars: dict[str, Any], loaded: dict[str, Any], *, reinit_regex: str | None = None,
    where: str = "checkpoint",
) -> dict[str, Any]:
    """Copies ``loaded`` into ``init_vars`` (numpy trees) where paths match.

    - ``pos_embed`` of another length (DeiT at another resolution) is resampled
      (:func:`halluvit_jax.models.resample_pos_embed`);
    - the classifier head (:data:`HEAD_REGEX`) of another shape, or matching ``reinit_regex``,
      is a new head: zeros, with one INFO line naming it;
    - other paths matching ``reinit_regex`` keep their fresh initialization;
    - any other leaf of another shape, or a cFFN folded in one and not the other, is a
      :class:`~halluvit_jax.loading.CheckpointMismatchError` (one line);
    - model leaves absent from the checkpoint keep their fresh initialization (warned).
    """
    out = {}
    for collection, tree in sorted(init_vars.items(), key=lambda kv: kv[0] != "params"):  # params first
        flat_init = loading.flatten(tree)
        flat_loaded = loading.flatten(loaded.get(collection, {}))
        merged, kept, new_head = {}, [], []
        for path, init in flat_init.items():
            src = flat_loaded.get(path)
            head = collection == "params" and re.search(HEAD_REGEX, path)
            shape = tuple(init.shape)
            if src is not None:
                src = np.asarray(src)
                if src.shape != shape and path.endswith("pos_embed"):
                    logger.info("Resampling %s from %s to %s.", path, src.shape, shape)
                    try:
                        src = resample_pos_embed_like(src, shape)
                    except ValueError as err:
                        raise loading.CheckpointMismatchError(f"init_from {where}: {err}") from None
            if head and (src is None or src.shape != shape or (reinit_regex and re.search(reinit_regex, path))):
                new_head.append(f"{path} {None if src is None else src.shape} -> {shape}")
                merged[path] = np.zeros(shape, np.asarray(init).dtype)
                continue
            if src is None or (reinit_regex and re.search(reinit_regex, path)):
                kept.append(path)
                merged[path] = init
                continue
            if src.shape != shape:
                raise loading.CheckpointMismatchError(
                    f"init_from {where}: {collection}/{path} has shape {src.shape}, the model {shape}; only "
                    "the classifier head and pos_embed may differ (check config.model_name / config.model)")
            merged[path] = src.astype(np.asarray(init).dtype)
        _form_mismatch(kept, flat_loaded, where)
        if new_head:
            logger.info("New classifier head, zero-initialized: %s.", ", ".join(new_head))
        unused = sorted(set(flat_loaded) - set(flat_init))
        if unused:
            logger.warning("Unused %s entries of the loaded checkpoint: %s", collection, unused[:10])
        if kept:
            logger.info("Freshly initialized %s entries: %s", collection, kept[:10])
        out[collection] = loading.unflatten(merged)
    return out
