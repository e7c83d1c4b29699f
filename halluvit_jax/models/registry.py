"""Model registry: every variant is a registered name with its default input config (timm-style)."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable

import flax.linen as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Default evaluation input of a model (as timm's `default_cfg`)."""

    input_size: int = 224
    crop_pct: float = 0.9
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    num_classes: int = 1000
    timm_name: str | None = None  # the timm model this one mirrors (baselines), for conversion/parity


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    input_config: InputConfig


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, input_config: InputConfig | None = None):
    """Decorator registering `factory(**overrides) -> nn.Module` under `name`."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"Model {name!r} is registered twice.")
        _REGISTRY[name] = _Entry(factory, input_config or InputConfig())
        return factory

    return wrap


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown model {name!r}.{hint} See halluvit_jax.list_models() for all names."
        ) from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; `overrides` replace fields (e.g. num_classes, deploy, drop_path_rate)."""
    return _entry(name).factory(**overrides)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_input_config(name: str) -> InputConfig:
    """The default input config (resolution, crop_pct, mean/std, interpolation) of a model."""
    return _entry(name).input_config
