"""Checkpoint files on disk: where they are, the one reader, and the writer of converted dirs.

Two layouts, both orbax (TensorStore) underneath::

    WORKDIR/config.json                 a training run (train.py --workdir)
    WORKDIR/checkpoints/<step>/state    the train state {'step', 'params', 'batch_stats',
                                        'opt_state', 'ema_params'}
    WORKDIR/checkpoints/<step>/data     the input iterator (train/checkpointing.py)
    WORKDIR/checkpoints/<step>/meta     {'step', 'process_count', 'checksums' of the state's values}

    DIR/model_card.json                 a converted directory (convert timm / hal) or a deploy
    DIR/variables/                      export (convert deploy: ``deploy: true`` and also
    DIR/model.safetensors               model.safetensors); variables {'params', 'batch_stats'?}

:func:`read_checkpoint` reads either (resume, ``init_from``, ``halluvit_jax.load`` and through
it evaluate, analysis and convert all call it). A damaged step is one
:class:`~halluvit_jax.checkpoint.errors.CorruptCheckpointError` line: the library's logs of the
cancelled reads (absl warnings, asyncio's "unhandled exception during asyncio.run() shutdown",
TensorStore's late wake-ups of a closed loop) are held back while reading (:func:`quiet_reads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file, save_file

from halluvit_jax.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    describe,
)
from halluvit_jax.checkpoint.trees import (
    device_checksums,
    flatten,
    has_training_branches,
    host_numpy,
    unflatten,
    value_checksums,
)

CARD_NAME = "model_card.json"
VARIABLES_NAME = "variables"
SAFETENSORS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CHECKPOINTS_NAME = "checkpoints"
STATE_NAME = "state"
_SKIPPED_COLLECTIONS = ("intermediates",)


# ---------------------------------------------------------------------------------------------
# Quiet reads.


class _DropReadNoise(logging.Filter):
    """Orbax's 'no metadata' warning for an item read on its own, and asyncio's report of the
    reads cancelled after the first one failed (the failure itself reaches us as an exception)."""

    MESSAGES = ("Metadata file does not exist", "Failed to get item metadata",
                "unhandled exception during asyncio.run() shutdown", "Task exception was never retrieved")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        return not any(m in message for m in self.MESSAGES)


class _ReadLoop(asyncio.SelectorEventLoop):
    """The event loop of one orbax read (``asyncio.run``), deaf once closed.

    When a read of a damaged step fails, orbax's ``asyncio.run`` returns and closes its loop
    while TensorStore still finishes the cancelled reads on its own threads; each then wakes
    the loop with ``call_soon_threadsafe``, which raises "Event loop is closed", and TensorStore
    prints that traceback straight to stderr (``PyErr_Print``: no logger or hook sees it), at
    any time up to interpreter exit. A closed loop has nobody left to wake: the call is dropped.
    """

    def call_soon_threadsafe(self, callback, *args, context=None):
        if self.is_closed():
            return None
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():  # closed between the check and the call
                return None
            raise


class _ReadLoopPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _ReadLoop()


@contextlib.contextmanager
def _read_loops() -> Iterator[None]:
    """Gives the ``asyncio.run`` calls inside the block a :class:`_ReadLoop`; a policy the
    program set itself (uvloop, say) is left alone."""
    # The policy API is deprecated from Python 3.14 (removed in 3.16).
    quiet = functools.partial(warnings.catch_warnings, action="ignore", category=DeprecationWarning)
    with quiet():
        previous = asyncio.get_event_loop_policy()
    if type(previous) is not asyncio.DefaultEventLoopPolicy:
        yield
        return
    with quiet():
        asyncio.set_event_loop_policy(_ReadLoopPolicy())
    try:
        yield
    finally:
        with quiet():
            asyncio.set_event_loop_policy(previous)


@contextlib.contextmanager
def quiet_reads() -> Iterator[None]:
    """Holds back the library noise of reading a checkpoint: the log records of
    :class:`_DropReadNoise`, and the tracebacks of late wake-ups of a closed read loop
    (:class:`_ReadLoop`). Orbax runs its reads (``asyncio.run``) before returning or raising,
    so the cancelled reads of a damaged step are logged inside this block."""
    flt = _DropReadNoise()
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio", "")]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        with _read_loops():
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


# ---------------------------------------------------------------------------------------------
# Where checkpoints are.


def is_converted(path: str | os.PathLike) -> bool:
    """A converted directory or deploy export (``model_card.json`` next to ``variables/``)."""
    path = os.fspath(path)
    if os.path.basename(path) == VARIABLES_NAME and not os.path.isfile(os.path.join(path, CARD_NAME)):
        path = os.path.dirname(path)
    return os.path.isfile(os.path.join(path, CARD_NAME))


def checkpoint_steps(root: str) -> list[int]:
    """Finalized steps of an orbax checkpoint root, ascending (half-written ones are not listed)."""
    if not os.path.isdir(root):
        return []
    return sorted(int(s) for s in ocp.utils.checkpoint_steps(root))


def checkpoint_root(path: str | os.PathLike) -> tuple[str, int | None]:
    """A workdir, its ``checkpoints/`` or a step directory -> (checkpoint root, the step or None)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, CHECKPOINTS_NAME)):
        path = os.path.join(path, CHECKPOINTS_NAME)
    if os.path.isdir(os.path.join(path, STATE_NAME)) and os.path.basename(path).isdigit():
        root, name = os.path.split(path)
        return root, int(name)
    return path, None


def workdir_of(root: str) -> str | None:
    """The training workdir holding checkpoint root ``root`` (with its config.json), if any."""
    for cand in (os.path.dirname(root), root):
        if os.path.isfile(os.path.join(cand, CONFIG_NAME)):
            return cand
    return None


def find_step(path: str | os.PathLike, step: int | None = None) -> tuple[str, int]:
    """(checkpoint root, step) of a training checkpoint path; the latest step by default.

    Raises :class:`CheckpointNotFoundError` when there is none (or not ``step``).
    """
    root, dir_step = checkpoint_root(path)
    steps = checkpoint_steps(root)
    if dir_step is not None:
        if step is not None and step != dir_step:
            raise CheckpointNotFoundError(f"{path} is step {dir_step}, not --step {step}")
        step = dir_step
    if not steps:
        raise CheckpointNotFoundError(
            f"no finalized checkpoint in {root}; pass a training workdir, its checkpoints/ directory, "
            "a step directory, or a converted checkpoint (with model_card.json)"
        )
    if step is None:
        return root, max(steps)
    if step not in steps:
        raise CheckpointNotFoundError(f"step {step} is not in {root} (have {sorted(steps)})")
    return root, step


# ---------------------------------------------------------------------------------------------
# Reading.


def _unreadable(root: str, step: int, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"checkpoint step {step} in {root} is unreadable (truncated or corrupted? {why})")


def read_state_metadata(root: str, step: int) -> dict[str, Any]:
    """The tree of array metadata (shape, dtype) of a step's train state, without reading arrays."""
    path = os.path.join(root, str(step), STATE_NAME)
    try:
        with quiet_reads():
            meta = ocp.PyTreeCheckpointer().metadata(path)
        tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
        if hasattr(tree, "tree"):
            tree = tree.tree
    except Exception as err:  # noqa: BLE001 - orbax / tensorstore raise many types for damaged files
        raise _unreadable(root, step, describe(err)) from None
    if not isinstance(tree, Mapping):
        raise _unreadable(root, step, f"the metadata in {path} is missing or unreadable")
    return dict(tree)


def read_state(root: str, step: int, like: Any = None) -> Any:
    """The train state of a step: host numpy arrays (any optimizer wrote it; no template needed),
    or, with ``like`` (an abstract train state of ``jax.ShapeDtypeStruct`` with shardings), the
    arrays placed onto those shardings, in ``like``'s structure (resume, on any mesh). The values
    read back are checked against the checksums saved with them (:func:`saved_checksums`)."""
    path = os.path.join(root, str(step), STATE_NAME)
    try:
        if like is None:
            tree = read_state_metadata(root, step)
            restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                                                  is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
            with quiet_reads():
                state = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
            found = value_checksums(state)
        else:
            with quiet_reads():
                state = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(path, args=ocp.args.StandardRestore(like))
            found = device_checksums(state)
    except CorruptCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - as above
        raise _unreadable(root, step, describe(err)) from None
    _check_checksums(saved_checksums(root, step), found, root, step)
    return state


CHECKSUMS_KEY = "checksums"  # in each step's ``meta`` item: {path: checksum} of the state's values


def saved_checksums(root: str, step: int) -> dict[str, int] | None:
    """The checksums saved with a step (its ``meta`` item), or None (checkpoints from before)."""
    try:
        with open(os.path.join(root, str(step), "meta", "metadata")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta.get(CHECKSUMS_KEY) if isinstance(meta, dict) else None


def _check_checksums(saved: Mapping[str, int] | None, found: Mapping[str, int], root: str, step: int) -> None:
    if saved is None:
        return
    bad = sorted(p for p in set(saved) | set(found) if saved.get(p) != found.get(p))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise _unreadable(root, step, f"the values of {', '.join(bad[:3])}{more} do not match the checksums "
                                      "saved with them")


def newest_intact_step(root: str, below: int | None = None) -> int | None:
    """The newest step (below ``below``) whose state reads completely, or None."""
    for s in reversed(checkpoint_steps(root)):
        if below is not None and s >= below:
            continue
        try:
            read_state(root, s)
            return s
        except CorruptCheckpointError:
            continue
    return None


def _read_card(root: str) -> dict[str, Any]:
    """``model_card.json`` of a converted directory (``{}`` when there is none)."""
    card_path = os.path.join(root, CARD_NAME)
    if not os.path.isfile(card_path):
        return {}
    try:
        with open(card_path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{card_path} is unreadable ({describe(err)})") from None


def read_variables_dir(path: str | os.PathLike, *, use_safetensors: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(variables, card)`` of a converted directory / deploy export (or its ``variables/``).

    ``card`` is ``{}`` without ``model_card.json``. Unreadable files raise :class:`CorruptCheckpointError`.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.basename(path) == VARIABLES_NAME and not os.path.isdir(os.path.join(path, VARIABLES_NAME)):
        root, ckpt = os.path.dirname(path), path
    else:
        root, ckpt = path, os.path.join(path, VARIABLES_NAME)
    card = _read_card(root)
    if use_safetensors:
        file = os.path.join(root, SAFETENSORS_NAME)
        if not os.path.isfile(file):
            raise CheckpointNotFoundError(f"no {SAFETENSORS_NAME} in {root}; export it with `convert deploy`")
        return unflatten(load_file(file)), card
    if not os.path.isdir(ckpt):
        raise CheckpointNotFoundError(
            f"no converted checkpoint at {path} (expected {ckpt}); write one with "
            "`python -m halluvit_jax.convert timm ...`"
        )
    try:
        with quiet_reads(), ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore(ckpt)
    except Exception as err:  # noqa: BLE001 - orbax / tensorstore raise many types for damaged files
        raise CorruptCheckpointError(
            f"cannot read checkpoint {ckpt} (truncated or corrupted? {describe(err)}); re-run the "
            "training / conversion that wrote it"
        ) from None
    return host_numpy(variables), card


@dataclasses.dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found: the variables and where they came from."""

    kind: str  # 'training' | 'converted' | 'deploy'
    path: str  # the training checkpoint root, or the converted directory
    variables: dict[str, Any]  # {'params', 'batch_stats'?}: host numpy (the EMA params with ema=True)
    step: int | None = None  # training checkpoints
    card: dict[str, Any] = dataclasses.field(default_factory=dict)  # model_card.json of a converted dir
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the workdir's config.json
    state: Any = None  # training: the whole train state (host numpy, or as ``like``)

    @property
    def where(self) -> str:
        """``checkpoint step N in ROOT`` or ``converted checkpoint DIR`` (for messages)."""
        return f"checkpoint step {self.step} in {self.path}" if self.kind == "training" else \
            f"converted checkpoint {self.path}"


def _read_training(path: str, step: int | None, like: Any) -> tuple[str, int, Any]:
    """(root, step, state) of the requested (default: newest) step. A broken step the caller
    did not name is reported with the newest intact one rather than silently replaced."""
    root, chosen = find_step(path, step)
    try:
        return root, chosen, read_state(root, chosen, like)
    except CorruptCheckpointError as err:
        if like is not None:  # resume: the caller sets the step aside and tries the one before
            raise
        intact = newest_intact_step(root, below=chosen)
        hint = (f"the newest intact step is {intact} (pass --step {intact})" if intact is not None
                else "no older step is intact")
        raise CorruptCheckpointError(f"{err}; {hint}; the broken step was left in place") from None


def read_checkpoint(path: str | os.PathLike, step: int | None = None, ema: bool = False, *,
                    like: Any = None, use_safetensors: bool = False) -> Checkpoint:
    """The one reader of every checkpoint the package writes (see the module docstring).

    Args:
      path: a training workdir, its ``checkpoints/``, a step directory, a converted directory,
        a deploy export, or the ``variables/`` of either.
      step: a training step (default: the newest; a broken newest step is an error naming the
        newest intact one).
      ema: the EMA weights of a training checkpoint as ``variables['params']``; an error when
        there are none (a run with ``ema_decay = 0``, a converted directory).
      like: an abstract train state with shardings: the state is read onto them (resume);
        ``variables`` are then left empty.
      use_safetensors: a deploy export's ``model.safetensors`` instead of ``variables/``.

    Raises :class:`~halluvit_jax.checkpoint.errors.CheckpointError` (one line): not found,
    unreadable, no EMA. Structure, shapes and finiteness are the caller's to check
    (:mod:`halluvit_jax.checkpoint.trees`), against the model it builds.
    """
    raw = os.fspath(path)
    path = os.path.abspath(raw)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"checkpoint {raw!r} does not exist; pass a training workdir (train.py --workdir) or a "
            "converted directory (with model_card.json)"
        )
    if is_converted(path):
        if ema:
            raise CheckpointError(f"{raw} is a converted checkpoint with one set of weights (no EMA); drop --ema")
        variables, card = read_variables_dir(path, use_safetensors=use_safetensors)
        root = os.path.dirname(path) if os.path.basename(path) == VARIABLES_NAME else path
        return Checkpoint(kind="deploy" if card.get("deploy") else "converted", path=root,
                          variables=_model_collections(variables), card=card)
    root, chosen, state = _read_training(path, step, like)
    ckpt = Checkpoint(kind="training", path=root, variables={}, step=chosen, state=state)
    workdir = workdir_of(root)
    if workdir:
        with open(os.path.join(workdir, CONFIG_NAME)) as f:
            ckpt.config = json.load(f)
    if like is None:
        if ema and not state.get("ema_params"):
            raise CheckpointError(f"{ckpt.where} has no EMA weights (the run had ema_decay = 0); drop --ema")
        ckpt.variables = _model_collections({"params": state["ema_params"] if ema else state["params"],
                                             "batch_stats": state.get("batch_stats")})
    return ckpt


def _model_collections(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of a variables dict (an empty ``batch_stats`` dropped)."""
    return {k: v for k, v in variables.items() if k == "params" or (k == "batch_stats" and v)}


def cffn_folded(path: str) -> bool:
    """Whether the checkpoint ``path`` (a transfer's ``init=``) has no cFFN in training form to
    train: a ``convert deploy`` export, or a training workdir of a folded (``model.hal.deploy``) or
    a baseline model. False for a ``convert timm`` / ``convert hal`` directory, a workdir in
    training form, and a path that does not hold a checkpoint (the trainer reports it).
    Reads metadata only."""
    if not path or not os.path.exists(path):
        return False
    if is_converted(path):
        try:
            return bool(_read_card(path).get("deploy"))
        except CheckpointError:
            return False
    try:
        meta = read_state_metadata(*find_step(path))
    except CheckpointError:
        return False
    return not has_training_branches(meta.get("params", {}))


# ---------------------------------------------------------------------------------------------
# Writing converted directories and deploy exports.


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


def save_variables(out_dir: str | os.PathLike, variables: Mapping[str, Any], card: Mapping[str, Any], *,
                   overwrite: bool = False) -> str:
    """Write `variables` (all collections but 'intermediates') and `card` under `out_dir`
    (``variables/`` + ``model_card.json``).

    Writes go to a temporary sibling directory that is renamed into place at the end, so a
    failure never leaves a partial `out_dir` behind. Refuses an existing non-empty `out_dir`
    unless `overwrite`. Returns the absolute path.
    """
    out_dir = check_output_dir(out_dir, overwrite)
    if "params" not in variables:
        raise ValueError("save_variables() expects a variables dict with a 'params' collection.")
    tree = host_numpy({k: v for k, v in variables.items() if k not in _SKIPPED_COLLECTIONS})
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


def save_safetensors(path: str, variables: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """All collections as one flat safetensors file with '/'-joined keys."""
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(variables).items()}
    save_file(flat, path, metadata=dict(metadata or {}))


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
