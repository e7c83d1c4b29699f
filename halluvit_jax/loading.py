"""One loader for every checkpoint the package writes: ``halluvit_jax.load(path)``.

``path`` is any of

* a training workdir (``train.py --workdir``), its ``checkpoints/`` directory or one step
  directory: the architecture and input come from the workdir's ``config.json``;
* a converted directory (``convert timm`` / ``convert hal``: ``variables/`` + ``model_card.json``);
* a deploy export (``convert deploy``: the same plus ``model.safetensors``; ``deploy: true``).

It returns :class:`Loaded`: the model (built with ``deploy=True`` when the variables are in
deploy form), its variables ``{'params', 'batch_stats'?}`` as host numpy arrays and its
:class:`InputSpec`. Everything loaded is verified: the variables' structure and shapes equal
the model's (no checkpoint leaf unused, no model leaf missing) and every value is finite; a
problem is one :class:`CheckpointError` line naming the first offending paths. A training
workdir whose newest step is unreadable (a deleted array file, a deleted ``_METADATA``) names
that step and the newest intact one instead of a TensorStore traceback.

The same checks serve resuming a run (``train/checkpointing.py``: :func:`verify_tree`,
:func:`first_non_finite`) so that they exist once. This module depends on ``models`` only; the
trainer, the converters, evaluation and analysis all depend on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file

from halluvit_jax.cli import UserError
from halluvit_jax.models import create_model, get_input_config, list_models
from halluvit_jax.reparam import reparameterize

logger = logging.getLogger("halluvit_jax.loading")

CARD_NAME = "model_card.json"
VARIABLES_NAME = "variables"
SAFETENSORS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CHECKPOINTS_NAME = "checkpoints"


class CheckpointError(UserError):
    """A checkpoint cannot be used as asked (one line, exit status 1)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the path (or not the requested step)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are missing or unreadable (a partial or damaged step)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's variables do not fit the model (structure or shapes)."""


class NonFiniteCheckpointError(CheckpointError, ValueError):
    """The checkpoint holds NaN or Inf values."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How to feed the model: square ``image_size``, eval ``crop_pct``, RGB ``mean``/``std`` in
    [0, 1] units, ``interpolation`` and the classifier's ``num_classes``."""

    image_size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    num_classes: int


@dataclasses.dataclass
class Loaded:
    """A model ready for ``model.apply(variables, x)``, and where it came from."""

    name: str  # registry name
    model: Any
    variables: dict[str, Any]
    input: InputSpec
    overrides: dict[str, Any]  # fields given to create_model (without deploy)
    deploy: bool  # variables (and model) in deploy form
    kind: str  # 'training' | 'converted' | 'deploy'
    path: str  # the training checkpoint root, or the converted directory
    step: int | None = None  # training checkpoints
    ema: bool = False
    card: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def source(self) -> str:
        """``training:ROOT/STEP`` or ``converted:DIR`` (for reports)."""
        return f"training:{self.path}/{self.step}" if self.kind == "training" else f"{self.kind}:{self.path}"


# ---------------------------------------------------------------------------------------------
# Reading files.


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Drops orbax's 'Metadata file does not exist' warning when an item directory (the
    ``state`` of a step, the ``variables`` of a converted dir) is read on its own."""

    class _Filter(logging.Filter):
        def filter(self, record):
            message = str(record.getMessage())
            return not any(m in message for m in ("Metadata file does not exist", "Failed to get item metadata"))

    flt = _Filter()
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}"


def is_converted(path: str | os.PathLike) -> bool:
    """A converted directory or deploy export (``model_card.json`` next to ``variables/``)."""
    return os.path.isfile(os.path.join(os.fspath(path), CARD_NAME))


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
    if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
        root, name = os.path.split(path)
        return root, int(name)
    return path, None


def read_state_metadata(root: str, step: int) -> dict[str, Any]:
    """The tree of array metadata (shape, dtype) of a step's train state, without reading arrays."""
    path = os.path.join(root, str(step), "state")
    try:
        with quiet_orbax():
            meta = ocp.PyTreeCheckpointer().metadata(path)
        tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
        if hasattr(tree, "tree"):
            tree = tree.tree
    except Exception as err:  # noqa: BLE001 - orbax / tensorstore raise many types for damaged files
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {root} is unreadable (truncated or corrupted? {_describe(err)})") from None
    if not isinstance(tree, Mapping):
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {root} is unreadable (truncated or corrupted? the metadata in {path} is "
            "missing or unreadable)")
    return dict(tree)


def _is_meta_leaf(x: Any) -> bool:
    return not isinstance(x, (dict, list, tuple))


def read_state(root: str, step: int) -> dict[str, Any]:
    """The train state of a step as host numpy arrays: ``{'step', 'params', 'batch_stats',
    'opt_state', 'ema_params'}``. Needs no template (the optimizer that wrote it is irrelevant)."""
    tree = read_state_metadata(root, step)
    path = os.path.join(root, str(step), "state")
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                                          is_leaf=_is_meta_leaf)
    try:
        with quiet_orbax():
            return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as err:  # noqa: BLE001 - as above
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {root} is unreadable (truncated or corrupted? {_describe(err)})") from None


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


def _host_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _host_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def read_variables_dir(path: str | os.PathLike, *, use_safetensors: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(variables, card)`` of a converted directory / deploy export (or its ``variables/``).

    ``card`` is ``{}`` without ``model_card.json``. Unreadable files raise :class:`CorruptCheckpointError`.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.basename(path) == VARIABLES_NAME and not os.path.isdir(os.path.join(path, VARIABLES_NAME)):
        root, ckpt = os.path.dirname(path), path
    else:
        root, ckpt = path, os.path.join(path, VARIABLES_NAME)
    card: dict[str, Any] = {}
    card_path = os.path.join(root, CARD_NAME)
    if os.path.isfile(card_path):
        try:
            with open(card_path) as f:
                card = json.load(f)
        except (OSError, ValueError) as err:
            raise CorruptCheckpointError(f"{card_path} is unreadable ({_describe(err)})") from None
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
        with quiet_orbax(), ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore(ckpt)
    except Exception as err:  # noqa: BLE001 - orbax / tensorstore raise many types for damaged files
        raise CorruptCheckpointError(
            f"cannot read checkpoint {ckpt} (truncated or corrupted? {_describe(err)}); re-run the "
            "training / conversion that wrote it"
        ) from None
    return _host_numpy(variables), card


# ---------------------------------------------------------------------------------------------
# Verification.


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{'params/blocks_0/attn/qkv/kernel': shape}`` of any pytree of arrays, array metadata
    or ``ShapeDtypeStruct`` (dict keys, attribute names and sequence indices alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, (dict, list, tuple)))[0]
    out = {}
    for path, leaf in leaves:
        shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
        out["/".join(_key_name(k) for k in path)] = tuple(int(d) for d in shape)
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{'params/blocks_0/attn/qkv/kernel': leaf}`` (the safetensors layout)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return tree


def _tree_differences(want: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]]
                     ) -> tuple[list[str], list[str], list[str]]:
    """``(shapes, missing, unused)`` between two ``{path: shape}`` maps, parameters first;
    a shape mismatch reads ``'path (found shape) vs model (wanted shape)'``."""
    order = lambda p: (not p.startswith("params"), p)  # noqa: E731 - parameters first
    missing = sorted(set(want) - set(got), key=order)
    unused = sorted(set(got) - set(want), key=order)
    shapes = [f"{p} {got[p]} vs model {want[p]}" for p in sorted(set(want) & set(got), key=order) if want[p] != got[p]]
    return shapes, missing, unused


def tree_problems(want: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], *,
                  names: tuple[str, str, str] = ("shape of", "missing", "unused"), limit: int = 3,
                  extra: Mapping[str, list[str]] | None = None) -> list[str]:
    """One phrase per kind of difference (:func:`_tree_differences`, named by ``names``), then
    ``extra``'s non-empty lists; each lists its first ``limit`` paths. Empty when none differ."""
    kinds = [*zip(names, _tree_differences(want, got)), *(extra or {}).items()]
    return [f"{name} {_first(items, limit)}" for name, items in kinds if items]


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def verify_tree(expected: Any, found: Any, *, what: str, fix: str) -> None:
    """Raises :class:`CheckpointMismatchError` unless ``found`` has exactly ``expected``'s leaves
    and shapes; the line names the first mismatching paths of each kind."""
    problems = tree_problems(flat_shapes(expected), flat_shapes(found))
    if problems:
        raise CheckpointMismatchError(f"{what} does not match the model: {'; '.join(problems)}; {fix}")


def first_non_finite(tree: Any) -> str | None:
    """The path of the first floating leaf of ``tree`` holding NaN/Inf (host arrays), or None."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            return "/".join(_key_name(k) for k in path)
    return None


def has_training_branches(params: Any) -> bool:
    """cFFN in training form (parallel ``branch_kernel``s) rather than folded for deployment."""
    return any("branch_kernel" in p for p in flat_shapes(params))


def expected_variables(model: Any, image_size: int) -> dict[str, Any]:
    """``jax.eval_shape`` of ``model.init`` on one image: the variables the model needs."""
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    )
    return {k: v for k, v in abstract.items() if k in ("params", "batch_stats")}


# ---------------------------------------------------------------------------------------------
# The loader.


def _workdir_of(root: str) -> str | None:
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


def _read_training(path: str, step: int | None) -> tuple[str, int, dict[str, Any]]:
    """(root, step, state) of the requested (default: newest) step; a broken step is named with
    the newest intact one rather than silently replaced."""
    root, chosen = find_step(path, step)
    try:
        return root, chosen, read_state(root, chosen)
    except CorruptCheckpointError as err:
        intact = newest_intact_step(root, below=chosen)
        hint = (f"the newest intact step is {intact} (pass --step {intact})" if intact is not None
                else "no older step is intact")
        raise CorruptCheckpointError(f"{err}; {hint}; the broken step was left in place") from None


def _input_spec(name: str, fields: Mapping[str, Any], given: Mapping[str, Any], num_classes: int,
                model: Any) -> InputSpec:
    default = get_input_config(name)
    size = getattr(model, "img_size", None) or given.get("input_size") or given.get("image_size") \
        or fields.get("img_size") or default.input_size
    return InputSpec(
        image_size=int(size),
        crop_pct=float(given.get("crop_pct") or default.crop_pct),
        mean=tuple(float(v) for v in (given.get("mean") or default.mean)),
        std=tuple(float(v) for v in (given.get("std") or default.std)),
        interpolation=str(given.get("interpolation") or default.interpolation),
        num_classes=int(num_classes),
    )


def load(path: str | os.PathLike, *, ema: bool = False, step: int | None = None, model: str | None = None,
         overrides: Mapping[str, Any] | None = None, deploy: bool = False, use_safetensors: bool = False,
         verify: bool = True) -> Loaded:
    """Model, variables and input spec of a training workdir, converted directory or deploy export.

    Args:
      ema: the EMA weights of a training checkpoint; one rule when there are none (the run had
        ``ema_decay = 0``, or the path is a converted directory): :class:`CheckpointError`.
      step: a training checkpoint step (default: the latest; a broken latest step is an error
        naming the newest intact one).
      model / overrides: architecture other than the checkpoint's (registry name, create_model
        fields updating the checkpoint's); the variables must still fit it exactly.
      deploy: fold cFFN into its deploy form (``reparameterize``) when it is in training form.
      use_safetensors: read a deploy export's ``model.safetensors`` instead of ``variables/``.
      verify: check structure, shapes and finiteness (see the module docstring).
    """
    raw = os.fspath(path)
    path = os.path.abspath(raw)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"checkpoint {raw!r} does not exist; pass a training workdir (train.py --workdir) or a "
            "converted directory (with model_card.json)"
        )
    card: dict[str, Any] = {}
    step_loaded = None
    if is_converted(path) or (os.path.basename(path) == VARIABLES_NAME and is_converted(os.path.dirname(path))):
        variables, card = read_variables_dir(path, use_safetensors=use_safetensors)
        if ema:
            raise CheckpointError(f"{raw} is a converted checkpoint with one set of weights (no EMA); drop --ema")
        name, fields, given = card.get("model"), dict(card.get("overrides") or {}), dict(card.get("input") or {})
        kind = "deploy" if card.get("deploy") else "converted"
        where = f"converted checkpoint {path}"
        root = path if os.path.basename(path) != VARIABLES_NAME else os.path.dirname(path)
    else:
        root, step_loaded, state = _read_training(path, step)
        where = f"checkpoint step {step_loaded} in {root}"
        if ema and not state.get("ema_params"):
            raise CheckpointError(f"{where} has no EMA weights (the run had ema_decay = 0); drop --ema")
        variables = {"params": state["ema_params"] if ema else state["params"]}
        if state.get("batch_stats"):
            variables["batch_stats"] = state["batch_stats"]
        name, fields, given = None, {}, {}
        workdir = _workdir_of(root)
        if workdir:
            with open(os.path.join(workdir, CONFIG_NAME)) as f:
                config = json.load(f)
            name, fields = config.get("model_name"), dict(config.get("model") or {})
            ci = config.get("input") or {}
            given = {"image_size": ci.get("image_size"), "crop_pct": ci.get("crop_pct"), "mean": ci.get("mean"),
                     "std": ci.get("std"), "interpolation": ci.get("interpolation")}
        kind = "training"
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    name = model or name
    if not name:
        raise CheckpointError(f"cannot tell the architecture of {raw!r} (no config.json / model card); "
                              f"pass the model name (one of {', '.join(list_models())})")
    fields.update(dict(overrides or {}))
    fields.pop("deploy", None)
    head = variables["params"].get("head") if isinstance(variables.get("params"), Mapping) else None
    num_classes = int(np.shape(head["kernel"])[-1]) if isinstance(head, Mapping) and "kernel" in head else 0
    if (overrides or {}).get("num_classes") is None:
        fields["num_classes"] = num_classes  # the classifier's shape is authoritative
    try:
        net = create_model(name, **fields)
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointMismatchError(f"cannot build {name} with {fields}: {' '.join(str(err).split())}") from None
    is_deploy = not has_training_branches(variables["params"])
    if deploy and not is_deploy:
        variables, is_deploy = {k: v for k, v in dict(reparameterize(variables)).items()}, True
        variables = _host_numpy(variables)
    if getattr(net, "hal", None) is not None:
        net = net.clone(hal=dataclasses.replace(net.hal, deploy=is_deploy))
    else:
        is_deploy = bool(deploy)
    spec = _input_spec(name, fields, given, num_classes, net)
    if verify:
        try:
            expected = expected_variables(net, spec.image_size)
        except (TypeError, ValueError) as err:  # e.g. an odd hMHSA head count in the overrides
            raise CheckpointMismatchError(
                f"cannot build {name} with {fields}: {' '.join(str(err).split()).rstrip('.')}") from None
        verify_tree(expected, variables, what=f"{where} ({name})",
                    fix="check the model name and fields (config.model / --set) against the checkpoint")
        bad = first_non_finite(variables)
        if bad:
            raise NonFiniteCheckpointError(f"{where} holds non-finite values ({bad}); use an earlier step")
    return Loaded(name=name, model=net, variables=variables, input=spec,
                  overrides={k: v for k, v in fields.items()}, deploy=is_deploy, kind=kind, path=root,
                  step=step_loaded, ema=bool(ema), card=card)


__all__ = ["CheckpointError", "CheckpointMismatchError", "CheckpointNotFoundError", "CorruptCheckpointError",
           "InputSpec", "Loaded", "NonFiniteCheckpointError", "find_step", "first_non_finite", "flat_shapes",
           "flatten", "has_training_branches", "is_converted", "load", "read_state", "read_variables_dir",
           "tree_problems", "unflatten", "verify_tree"]
