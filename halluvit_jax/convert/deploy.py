"""Training checkpoint -> deploy export: folded cFFN, no optimizer state, a model card.

    python -m halluvit_jax.convert deploy --checkpoint runs/demo --output exported/demo

Output directory::

    variables/           orbax checkpoint of the deploy-form {'params', ['batch_stats']}
    model.safetensors    the same variables, flat '/'-joined keys ('params/blocks_0/attn/qkv/kernel')
    model.jaxexport      with --format stablehlo: serialized jax.export (cpu/cuda/tpu, dynamic batch)
    model.onnx           with --format onnx: ONNX (jax2onnx), dynamic batch, checked in onnxruntime
    model_card.json      model, overrides, deploy: true, input (resolution, crop_pct, mean/std,
                         interpolation, num_classes), complexity (params, MACs), source, check

`create_model(card['model'], deploy=True, **card['overrides'])` applied to the variables gives
the training model's eval logits (the export checks this on two random images). The directory
is written to a temporary sibling and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from halluvit_jax import loading
from halluvit_jax.checkpoint.io import (
    SAFETENSORS_NAME,
    check_output_dir,
    normal_modes,
    save_safetensors,
    save_variables,
)
from halluvit_jax.complexity import count_macs, count_params
from halluvit_jax.convert.export import parse_formats, write_formats
from halluvit_jax.convert.state_dict import ConversionError, check_variables
from halluvit_jax.models import create_model, deploy_form, get_input_config
from halluvit_jax.reparam import reparameterize

MAX_FOLD_ERROR = 1e-4  # relative; float32 folding is ~1e-6


def _input_from_registry(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    cfg = dataclasses.asdict(get_input_config(name))
    if overrides.get("img_size"):
        cfg["input_size"] = int(overrides["img_size"])
    if "num_classes" in overrides:
        cfg["num_classes"] = int(overrides["num_classes"])
    return cfg


def card_fields(loaded: loading.Loaded) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(overrides, input, source) of the model card for a checkpoint read by :func:`halluvit_jax.load`."""
    if loaded.kind == "training":
        overrides = dict(loaded.overrides)
        inp = {"input_size": loaded.input.image_size, "crop_pct": loaded.input.crop_pct,
               "mean": list(loaded.input.mean), "std": list(loaded.input.std),
               "interpolation": loaded.input.interpolation, "num_classes": loaded.input.num_classes}
        source = {"format": "training", "path": loaded.path, "step": int(loaded.step), "ema": loaded.ema}
        return overrides, {**_input_from_registry(loaded.name, overrides), **inp}, source
    overrides = dict(loaded.card.get("overrides") or {})
    inp = dict(loaded.card.get("input") or _input_from_registry(loaded.name, overrides))
    return overrides, inp, {"format": "converted", "path": loaded.path}


def _complexity(model: Any, variables: Mapping[str, Any], size: int) -> dict[str, Any]:
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), dict(variables))
    return {
        "params": int(count_params(abstract)),
        "macs": int(count_macs(model, (1, size, size, 3), variables=abstract, train=False)),
        "resolution": int(size),
        "form": "deploy",
    }


def fold_check(train_model, train_vars, deploy_model, deploy_vars, size: int, seed: int = 0) -> float:
    """Max relative difference of eval logits, training form vs deploy form, on random images."""
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, size, size, 3)), jnp.float32)
    a = np.asarray(jax.jit(lambda v, x: train_model.apply(v, x))(train_vars, x), np.float64)
    b = np.asarray(jax.jit(lambda v, x: deploy_model.apply(v, x))(deploy_vars, x), np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def export_deploy(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    use_ema: bool = False,
    step: int | None = None,
    overwrite: bool = False,
    model: str | None = None,
    formats: Sequence[str] = ("orbax",),
) -> dict[str, Any]:
    """Fold, check and write the deploy form of `checkpoint` to `output`; returns the model card.

    `model` (optional) names the expected model; a checkpoint of another architecture raises
    `ConversionError`. Refuses a non-empty `output` unless `overwrite`. `formats` adds
    ``'stablehlo'`` (model.jaxexport) and/or ``'onnx'`` (model.onnx) to the orbax variables,
    safetensors and card that are always written (`halluvit_jax.convert.export`).
    """
    formats = parse_formats(formats)
    out_dir = check_output_dir(output, overwrite)  # before any slow work
    loaded = loading.load(checkpoint, ema=use_ema, step=step)
    name = model or loaded.name
    overrides, inp, source = card_fields(loaded)
    overrides = {k: v for k, v in overrides.items() if k != "deploy"}
    try:
        train_model = create_model(name, **overrides)
        deploy_model = deploy_form(train_model)
    except TypeError as err:
        raise ConversionError(f"Checkpoint overrides do not fit {name}: {err}.") from None
    size = int(getattr(train_model, "img_size", None) or inp.get("input_size") or 224)
    shape = (1, size, size, 3)
    train_vars = check_variables(loaded.variables, train_model, shape)  # wrong model -> one error
    deploy_vars = check_variables(reparameterize(train_vars), deploy_model, shape)
    err = fold_check(train_model, train_vars, deploy_model, deploy_vars, size)
    if not err < MAX_FOLD_ERROR:
        raise ConversionError(f"Deploy form differs from the training form by {err:.2e} (relative); not exported.")
    card = {
        "model": name,
        "overrides": overrides,
        "deploy": True,
        "input": {**inp, "input_size": size, "num_classes": int(overrides.get("num_classes", inp.get("num_classes", 0)))},
        "complexity": _complexity(deploy_model, deploy_vars, size),
        "source": source,
        "check": {"max_rel_logit_error_vs_training_form": err},
        "files": {"orbax": "variables", "safetensors": SAFETENSORS_NAME},
    }
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.stage-", dir=parent)
    try:
        exported = write_formats(formats, os.path.join(stage, "formats"), deploy_model, deploy_vars, size)
        card["files"].update(exported["files"])
        card["check"].update(exported["check"])
        if exported["export"]:
            card["export"] = exported["export"]
        staged = save_variables(os.path.join(stage, "out"), deploy_vars, card)
        save_safetensors(os.path.join(staged, SAFETENSORS_NAME), deploy_vars,
                         {"model": name, "card": json.dumps(card, default=str)})
        for fname in exported["files"].values():
            os.rename(os.path.join(stage, "formats", fname), os.path.join(staged, fname))
        normal_modes(staged)
        if os.path.isdir(out_dir):
            os.rename(out_dir, os.path.join(stage, "old"))
        os.rename(staged, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return card


def load_deploy(path: str | os.PathLike, *, use_safetensors: bool = False):
    """`(model, variables, card)` of an export: the deploy-form model ready for `model.apply`
    (read and verified by :func:`halluvit_jax.load`)."""
    loaded = loading.load(path, use_safetensors=use_safetensors)
    return loaded.model, loaded.variables, loaded.card


__all__ = ["card_fields", "export_deploy", "fold_check", "load_deploy"]
