"""Backbones (DeiT, PVTv2, NextViT; baseline and `_hal`) and the model registry."""

from halluvit_jax.models.registry import (
    InputConfig,
    create_model,
    deploy_form,
    get_input_config,
    list_models,
    register_model,
)

# Importing the families registers their models.
from halluvit_jax.models import deit, nextvit, pvt_v2  # noqa: E402,F401
from halluvit_jax.models.deit import resample_pos_embed  # noqa: E402  (init_from at another size)

__all__ = [
    "InputConfig",
    "create_model",
    "deploy_form",
    "get_input_config",
    "list_models",
    "register_model",
    "resample_pos_embed",
]
