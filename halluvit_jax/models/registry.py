"""Model registry: every variant is a registered name with its default input config (timm-style)."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable

import flax.linen as nn
import jax

from halluvit_jax.layers.config import HalConfig, check_impl

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


# Flat hal fields of older configs and checkpoints (config.json "model" overrides), mapped
# onto HalConfig fields.
_LEGACY_HAL_FIELDS = {"hal_variant": "variant", "hal_init": "hal_init", "cffn": "cffn",
                      "compact_ratio": "compact_ratio", "num_branches": "num_branches",
                      "factorize": "factorize", "round_to": "round_to", "deploy": "deploy"}
_DEFAULT = object()


def _default_hal(factory: Callable[..., nn.Module]) -> HalConfig | None:
    return getattr(factory, "keywords", {}).get("hal")


def create_model(name: str, *, hal: Any = _DEFAULT, impl: str = "auto", **overrides: Any) -> nn.Module:
    """Build a registered model.

    - ``hal``: a `HalConfig` (or a dict of its fields; None: the baseline). Default: the
      registered one (`HalConfig()` for ``*_hal`` names, None for baselines). A baseline name
      with a `HalConfig` gives the hal model where the head counts are even
      (``create_model("deit_small", hal=HalConfig())`` is ``deit_small_hal``).
    - ``impl``: ``"auto"`` | ``"plain"`` | ``"fused"`` | ``"accel"`` | ``"pallas"``
      (`halluvit_jax.layers.config`).
    - ``overrides`` replace other fields (num_classes, drop_path_rate, remat, dtype, ...).
      ``deploy=True`` and the flat hal fields of older configs (``hal_variant``, ``cffn``,
      ``compact_ratio``, ...) are folded into the `HalConfig`; ``deploy=True`` on a baseline
      gives its `deploy_form` (NextViT: pre-BatchNorms merged; other baselines: themselves).
    """
    entry = _entry(name)
    check_impl(impl)
    hal = _default_hal(entry.factory) if hal is _DEFAULT else HalConfig.make(hal)
    if isinstance(overrides.get("hal"), bool):  # legacy {"hal": true/false}
        hal = HalConfig.make(overrides.pop("hal")) and (hal or HalConfig())
    legacy = {_LEGACY_HAL_FIELDS[k]: overrides.pop(k) for k in list(overrides)
              if k in _LEGACY_HAL_FIELDS}
    baseline_deploy = False
    if legacy:
        if hal is None:
            if legacy == {"deploy": legacy.get("deploy")}:
                baseline_deploy, legacy = bool(legacy["deploy"]), {}  # deploy_form(baseline) below
            else:
                raise ValueError(
                    f"{sorted(legacy)} configure hMHSA/cFFN, but {name!r} is built as a baseline; "
                    "pass hal=HalConfig(...) (or use the model's _hal name)."
                )
        if legacy:
            hal = dataclasses.replace(hal, **legacy)
    model = entry.factory(hal=hal, impl=impl, **overrides)
    if baseline_deploy:
        model = deploy_form(model)
    if hal is not None:
        odd = [h for h in model.attention_heads() if h % 2]
        if odd:
            raise ValueError(
                f"{name!r} with hMHSA needs even head counts (half real, half hallucinated), but "
                f"its attention layers have {model.attention_heads()} heads; use the {name}_hal "
                "preset, whose head counts are even, or pass num_heads=... with even counts."
                if not name.endswith("_hal") else
                f"{name!r}: hMHSA needs even head counts, got {model.attention_heads()}; pass "
                "num_heads=... with even counts that divide the widths."
            )
    return model


def deploy_form(model: nn.Module) -> nn.Module:
    """``model`` in the form `halluvit_jax.reparameterize`'s variables fit: its cFFNs built folded
    (``hal.deploy=True``, which also merges NextViT's pre-BatchNorms) and, for a baseline with a
    ``merge_pre_bn`` field (NextViT), ``merge_pre_bn=True``; any other baseline as is."""
    hal = getattr(model, "hal", None)
    if hal is not None:
        return model.clone(hal=dataclasses.replace(hal, deploy=True))
    if hasattr(model, "merge_pre_bn") and not model.merge_pre_bn:
        return model.clone(merge_pre_bn=True)
    return model


REMAT_OPTIONS = ("none", "block")
# jax.checkpoint_policies that are policies themselves (not policy factories).
REMAT_POLICIES = ("dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable")


def remat_block(block: type[nn.Module], remat: str, static_argnums: tuple[int, ...] = (2,)):
    """``block``, rematerialized in the backward pass as ``remat`` says.

    - ``"none"``: as is (XLA keeps what autodiff saves).
    - ``"block"``: ``nn.remat``: only the block's inputs are kept, everything else recomputed.
    - a name in ``jax.checkpoint_policies`` (e.g. ``"dots_with_no_batch_dims_saveable"``:
      keep the weight matmuls' outputs, recompute the rest): ``nn.remat`` with that policy.

    ``static_argnums`` index the block's ``__call__`` arguments (self is 0): the ``train`` flag
    and any grid.
    """
    if remat == "none":
        return block
    if remat == "block":
        return nn.remat(block, static_argnums=static_argnums)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat {remat!r}; use one of {list(REMAT_OPTIONS + REMAT_POLICIES)}.")
    policy = getattr(jax.checkpoint_policies, remat)
    return nn.remat(block, policy=policy, static_argnums=static_argnums)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_input_config(name: str) -> InputConfig:
    """The default input config (resolution, crop_pct, mean/std, interpolation) of a model."""
    return _entry(name).input_config
