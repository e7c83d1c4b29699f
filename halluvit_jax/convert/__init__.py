"""Checkpoint conversion: timm / original PyTorch state_dicts -> Flax variables, and their I/O.

    from halluvit_jax.convert import from_timm, load_state_dict_file, save_variables
    variables = from_timm(load_state_dict_file("deit_small.pth"), "deit_small")

Each model family has a module `timm_<family>` exposing
`convert(state_dict: dict[str, np.ndarray], model_name: str) -> variables` (a pure key
mapping); `from_timm` picks it from `FAMILIES`, lets the family adapt the result to the
model (e.g. resample DeiT's position embedding), and always ends with `check_variables`.
The command line lives in `python -m halluvit_jax.convert`.

Beyond timm (docs/conversion.md): `baseline_to_hal` initializes a hal model from its pretrained
baseline (`convert.hal`), `export_deploy` writes the folded deploy form of a training checkpoint
with a safetensors file and a model card (`convert.deploy`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from halluvit_jax.convert.state_dict import (
    ConversionError,
    TrackedStateDict,
    check_variables,
    expected_shapes,
    load_state_dict_file,
    to_numpy_state_dict,
    unwrap_state_dict,
)
from halluvit_jax.checkpoint.io import save_variables
from halluvit_jax.convert.deploy import export_deploy, load_deploy
from halluvit_jax.convert.hal import baseline_to_hal
from halluvit_jax.models import create_model, get_input_config, list_models

# Registry-name prefix -> converter module (imported on first use, so a family whose module is
# missing or broken does not stop the others from working).
FAMILIES: dict[str, str] = {
    "deit": "halluvit_jax.convert.timm_deit",
    "pvt_v2": "halluvit_jax.convert.timm_pvt_v2",
    "nextvit": "halluvit_jax.convert.timm_nextvit",
}


def resolve_model_name(model_name: str) -> str:
    """Our registry name for `model_name`, which may also be a timm name (deit_small_patch16_224)."""
    names = list_models()
    if model_name in names:
        return model_name
    for name in names:
        if get_input_config(name).timm_name == model_name:
            return name
    get_input_config(model_name)  # raises the registry's "Unknown model ... Did you mean" error
    return model_name


def _family(model_name: str) -> str:
    for prefix in sorted(FAMILIES, key=len, reverse=True):
        if model_name.startswith(prefix):
            return prefix
    raise ConversionError(
        f"No timm converter for {model_name!r}; supported families: {', '.join(FAMILIES)}."
    )


def _converter_module(family: str):
    try:
        return importlib.import_module(FAMILIES[family])
    except ImportError as err:
        raise ConversionError(
            f"The {family} converter ({FAMILIES[family]}) is not available: {err}."
        ) from err


def from_timm(state_dict: Mapping[str, Any], model_name: str, **overrides: Any) -> dict[str, Any]:
    """Convert a timm (or original-repo) state_dict into variables of `create_model(model_name, **overrides)`.

    `state_dict` may hold torch tensors or numpy arrays and may be wrapped (`{'model': ...}`,
    `{'state_dict': ...}`). `overrides` must describe the checkpoint's architecture
    (num_classes, reduced depths, ...); a DeiT built with another `img_size` gets the
    checkpoint's position embedding resampled. Raises one `ConversionError` listing every
    missing / unexpected / misshaped variable and unused checkpoint key.
    """
    name = resolve_model_name(model_name)
    if get_input_config(name).timm_name is None:
        raise ConversionError(
            f"{name!r} has no timm counterpart (hal variants are trained, not converted); "
            "convert into its baseline, e.g. "
            f"{name.removesuffix('_hal')!r}."
        )
    module = _converter_module(_family(name))
    sd = TrackedStateDict(to_numpy_state_dict(unwrap_state_dict(state_dict)))
    model = create_model(name, **overrides)
    size = getattr(model, "img_size", None) or get_input_config(name).input_size
    input_shape = (1, size, size, 3)
    try:
        variables = module.convert(sd, name)
    except KeyError as err:
        raise ConversionError(
            f"Checkpoint lacks key {err} needed for {name!r}; is it a {name} state_dict?"
        ) from None
    expected = expected_shapes(model, input_shape)
    fit = getattr(module, "fit_to_model", None)
    if fit is not None:
        variables = fit(variables, expected)
    return check_variables(variables, model, input_shape, unused_keys=sd.unused(), expected=expected)


__all__ = [
    "FAMILIES",
    "ConversionError",
    "baseline_to_hal",
    "check_variables",
    "export_deploy",
    "from_timm",
    "load_deploy",
    "load_state_dict_file",
    "resolve_model_name",
    "save_variables",
    "to_numpy_state_dict",
    "unwrap_state_dict",
]
