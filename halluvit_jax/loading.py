"""``halluvit_jax.load(path)``: a model ready to apply, from any checkpoint the package writes.

``path`` is any of

* a training workdir (``train.py --workdir``), its ``checkpoints/`` directory or one step
  directory: the architecture and input come from the workdir's ``config.json``;
* a converted directory (``convert timm`` / ``convert hal``: ``variables/`` + ``model_card.json``);
* a deploy export (``convert deploy``: the same plus ``model.safetensors``; ``deploy: true``).

The files are read by :func:`halluvit_jax.checkpoint.read_checkpoint` (the one reader, also of
resume and ``init_from``). This module builds the model the checkpoint describes and returns
:class:`Loaded`: the model (built with ``deploy=True`` when the variables are in deploy form),
its variables ``{'params', 'batch_stats'?}`` as host numpy arrays and its :class:`InputSpec`.
Everything loaded is verified: the variables' structure and shapes equal the model's (no
checkpoint leaf unused, no model leaf missing) and every value is finite; a problem is one
:class:`CheckpointError` line naming the first offending paths. A training workdir whose newest
step is unreadable (a deleted or truncated array file, a deleted ``_METADATA``, values that do
not match the checksums saved with them) names that step and the newest intact one instead of a
TensorStore traceback.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from halluvit_jax.checkpoint import io
from halluvit_jax.checkpoint.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
)
from halluvit_jax.checkpoint.trees import first_non_finite, has_training_branches, host_numpy, verify_tree
from halluvit_jax.models import create_model, deploy_form, get_input_config, list_models
from halluvit_jax.reparam import has_unmerged_pre_bn, reparameterize


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


def expected_variables(model: Any, image_size: int) -> dict[str, Any]:
    """``jax.eval_shape`` of ``model.init`` on one image: the variables the model needs."""
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    )
    return {k: v for k, v in abstract.items() if k in ("params", "batch_stats")}


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


def _described(ckpt: io.Checkpoint) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """(registry name, create_model fields, input fields) the checkpoint records about itself:
    the model card of a converted directory, the workdir's config.json of a training run."""
    if ckpt.kind != "training":
        card = ckpt.card
        return card.get("model"), dict(card.get("overrides") or {}), dict(card.get("input") or {})
    config = ckpt.config
    ci = config.get("input") or {}
    given = {k: ci.get(k) for k in ("image_size", "crop_pct", "mean", "std", "interpolation")}
    return config.get("model_name"), dict(config.get("model") or {}), given


def _build(name: str, fields: Mapping[str, Any]) -> Any:
    try:
        return create_model(name, **fields)
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointMismatchError(f"cannot build {name} with {dict(fields)}: {' '.join(str(err).split())}") from None


def _verify(net: Any, name: str, fields: Mapping[str, Any], variables: Mapping[str, Any], image_size: int,
            where: str) -> None:
    """Structure and shapes equal the model's, every value finite (one line otherwise)."""
    try:
        expected = expected_variables(net, image_size)
    except (TypeError, ValueError) as err:  # e.g. an odd hMHSA head count in the overrides
        raise CheckpointMismatchError(
            f"cannot build {name} with {dict(fields)}: {' '.join(str(err).split()).rstrip('.')}") from None
    verify_tree(expected, variables, what=f"{where} ({name})",
                fix="check the model name and fields (config.model / --set) against the checkpoint")
    bad = first_non_finite(variables)
    if bad:
        raise NonFiniteCheckpointError(f"{where} holds non-finite values ({bad}); use an earlier step")


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
      deploy: fold cFFN (and merge NextViT's pre-BatchNorms) into the deploy form
        (``reparameterize``) when the variables are in training form.
      use_safetensors: read a deploy export's ``model.safetensors`` instead of ``variables/``.
      verify: check structure, shapes and finiteness (see the module docstring).
    """
    ckpt = io.read_checkpoint(path, step, ema, use_safetensors=use_safetensors)
    variables = ckpt.variables
    name, fields, given = _described(ckpt)
    name = model or name
    if not name:
        raise CheckpointError(f"cannot tell the architecture of {os.fspath(path)!r} (no config.json / model "
                              f"card); pass the model name (one of {', '.join(list_models())})")
    fields.update(dict(overrides or {}))
    fields.pop("deploy", None)
    head = variables["params"].get("head") if isinstance(variables.get("params"), Mapping) else None
    num_classes = int(np.shape(head["kernel"])[-1]) if isinstance(head, Mapping) and "kernel" in head else 0
    if (overrides or {}).get("num_classes") is None:
        fields["num_classes"] = num_classes  # the classifier's shape is authoritative
    net = _build(name, fields)
    params = variables["params"]
    is_deploy = not (has_training_branches(params) or has_unmerged_pre_bn(params))
    # A deploy export written before NextViT's pre-BatchNorms were merged is merged here.
    if (deploy or (ckpt.card or {}).get("deploy")) and not is_deploy:
        variables, is_deploy = host_numpy(dict(reparameterize(variables))), True
    if getattr(net, "hal", None) is not None:
        net = net.clone(hal=dataclasses.replace(net.hal, deploy=is_deploy))
    elif deploy_form(net) != net:  # a baseline with a deploy form of its own (NextViT)
        net = deploy_form(net) if is_deploy else net
    else:
        is_deploy = bool(deploy)
    spec = _input_spec(name, fields, given, num_classes, net)
    if verify:
        _verify(net, name, fields, variables, spec.image_size, ckpt.where)
    return Loaded(name=name, model=net, variables=variables, input=spec, overrides=dict(fields),
                  deploy=is_deploy, kind=ckpt.kind, path=ckpt.path, step=ckpt.step, ema=bool(ema), card=ckpt.card)


__all__ = ["CheckpointError", "CheckpointMismatchError", "CheckpointNotFoundError", "CorruptCheckpointError",
           "InputSpec", "Loaded", "NonFiniteCheckpointError", "expected_variables", "load"]
