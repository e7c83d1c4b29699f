"""Saving and resuming the train state and the input iterator, and starting from `init_from`.

Layout of a workdir::

    workdir/checkpoints/<step>/state   train state (sharded arrays; restores onto any mesh)
    workdir/checkpoints/<step>/data    grain iterator state, one JSON per process
    workdir/checkpoints/<step>/meta    {'step', 'process_count', 'checksums' of the state's values}

Only finalized steps are listed by orbax (it writes to a temporary directory and renames), so a
process killed mid-save never leaves a half checkpoint that resume would pick up. Every read goes
through :func:`halluvit_jax.checkpoint.read_checkpoint` (the train state onto the run's
shardings on resume; host arrays for ``init_from``); the manager restores only the iterator.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from halluvit_jax.checkpoint.errors import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
    describe,
)
from halluvit_jax.checkpoint.io import CHECKSUMS_KEY, CONFIG_NAME, read_checkpoint, read_state_metadata
from halluvit_jax.checkpoint.trees import (
    all_finite,
    device_checksums,
    first_non_finite,
    flatten,
    unflatten,
    verify_tree,
)
from halluvit_jax.models import resample_pos_embed

logger = logging.getLogger("halluvit_jax.train")


def save_config(config: Any, workdir: str) -> None:
    """The run's config as ``WORKDIR/config.json`` (process 0): what resume and ``halluvit_jax.load``
    read back."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_NAME), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


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
    """Saves (asynchronously if the manager is async) the train state and the iterator state,
    with the checksums of the state's values in ``meta`` (checked on every read)."""
    items = {
        "state": ocp.args.StandardSave(state),
        "meta": ocp.args.JsonSave({"step": int(step), "process_count": jax.process_count(),
                                   CHECKSUMS_KEY: device_checksums(state)}),
    }
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any | None
) -> Any:
    """Restores the train state onto ``abstract_state``'s shardings (any mesh); the iterator too
    when the checkpoint was written with the same process count (else it restarts with a warning).

    Verifies first that the checkpoint's structure and shapes are the model's (else one
    :class:`~halluvit_jax.checkpoint.errors.CheckpointMismatchError` line), and after reading that
    every value is finite (else :class:`~halluvit_jax.checkpoint.errors.NonFiniteCheckpointError`).
    Unreadable files raise :class:`~halluvit_jax.checkpoint.errors.CorruptCheckpointError`.
    """
    root = os.fspath(manager.directory)
    verify_tree(
        abstract_state, read_state_metadata(root, step), what=f"checkpoint step {step} in {root}",
        fix="resume with the config that wrote it (see config.json next to checkpoints/) or use a new --workdir",
    )
    state = read_checkpoint(root, step, like=abstract_state).state
    if data_iter is not None:
        _restore_iterator(manager, step, data_iter)
    if not bool(jax.device_get(jax.jit(all_finite)(state))):
        bad = first_non_finite(jax.device_get(state)) if jax.process_count() == 1 else "some leaf"
        raise NonFiniteCheckpointError(
            f"checkpoint step {step} in {root} holds non-finite values ({bad}); it cannot be resumed from: "
            f"move {root}/{step} away to resume from the step before it, or use a new --workdir"
        )
    return state


def _restore_iterator(manager: ocp.CheckpointManager, step: int, data_iter: Any) -> None:
    """The input iterator's position at ``step`` (written with this process count), in place."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("process_count") != jax.process_count():
            logger.warning(
                "Checkpoint %d was written by %s processes, this run has %d: the input pipeline "
                "restarts from its beginning (the train state is restored exactly).",
                step, meta.get("process_count"), jax.process_count(),
            )
            return
        manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as err:  # noqa: BLE001 - orbax / grain raise many types for damaged files
        raise CorruptCheckpointError(f"checkpoint step {step} in {os.fspath(manager.directory)} is unreadable "
                                     f"(truncated or corrupted? {describe(err)})") from None


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
        except CorruptCheckpointError as err:
            moved = set_aside(root, step)
            logger.warning("%s; skipping it (kept as %s) and trying the previous step.", err, moved)
            manager.reload()
            continue
        logger.info("Resuming from %s step %d.", root, step)
        return state
    return None


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
                raise CheckpointMismatchError(
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
      :class:`~halluvit_jax.CheckpointMismatchError` (one line);
    - model leaves absent from the checkpoint keep their fresh initialization (warned).
    """
    out = {}
    for collection, tree in sorted(init_vars.items(), key=lambda kv: kv[0] != "params"):  # params first
        flat_init = flatten(tree)
        flat_loaded = flatten(loaded.get(collection, {}))
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
                        raise CheckpointMismatchError(f"init_from {where}: {err}") from None
            if head and (src is None or src.shape != shape or (reinit_regex and re.search(reinit_regex, path))):
                new_head.append(f"{path} {None if src is None else src.shape} -> {shape}")
                merged[path] = np.zeros(shape, np.asarray(init).dtype)
                continue
            if src is None or (reinit_regex and re.search(reinit_regex, path)):
                kept.append(path)
                merged[path] = init
                continue
            if src.shape != shape:
                raise CheckpointMismatchError(
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
        out[collection] = unflatten(merged)
    return out


def read_pretrained(path: str) -> dict[str, Any]:
    """Variables {'params', 'batch_stats'?} (host numpy) of a converted checkpoint or a training
    checkpoint (its latest step), for ``init_from``; non-finite values are refused."""
    ckpt = read_checkpoint(path)
    if ckpt.kind == "training":
        logger.info("Loaded step %d of training checkpoint %s.", ckpt.step, ckpt.path)
    else:
        logger.info("Loaded converted checkpoint %s (%s).", path, ckpt.card.get("model", "?"))
    bad = first_non_finite(ckpt.variables)
    if bad:
        raise NonFiniteCheckpointError(f"init_from {ckpt.where} holds non-finite values ({bad})")
    return ckpt.variables


def init_from(state: Any, path: str, *, tx: Any, shardings: Any, reinit_regex: str | None = None,
              use_ema: bool = False) -> Any:
    """The fresh train ``state`` with checkpoint ``path`` merged in (:func:`merge_pretrained`):
    its parameters and BatchNorm statistics placed on ``shardings``, a new optimizer state for
    them and, with ``use_ema``, an EMA that starts at them."""
    loaded = read_pretrained(path)
    fresh = {"params": state.params, "batch_stats": state.batch_stats}
    if jax.process_count() > 1:  # parameters span hosts: gather full copies
        fresh = multihost_utils.process_allgather(fresh, tiled=True)
    merged = merge_pretrained(jax.device_get(fresh), loaded, reinit_regex=reinit_regex or None, where=path)
    params = jax.device_put(merged["params"], shardings.params)
    state = state.replace(
        params=params,
        batch_stats=jax.device_put(merged["batch_stats"], shardings.batch_stats),
        opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
        ema_params=jax.device_put(merged["params"], shardings.ema_params) if use_ema else {},
    )
    logger.info("Initialized from %s.", path)
    return state
