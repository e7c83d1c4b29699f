"""PyTorch state dicts for the converters: reading them, mapping their layout to Flax, and the
final check of the converted variables against the model.

Converters are pure functions `convert(state_dict, model_name) -> variables` over numpy
arrays. `check_variables` compares the result with the model's own variable shapes and
raises a single `ConversionError` naming every problem at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from halluvit_jax.checkpoint.trees import flatten, tree_problems, unflatten

# State-dict entries that carry no model information and are dropped silently.
IGNORED_KEY_PATTERNS = (re.compile(r"(^|\.)num_batches_tracked$"),)


class ConversionError(ValueError):
    """A checkpoint does not fit the model (missing / unexpected / misshaped entries)."""


# --------------------------------------------------------------------------------------------
# Loading.


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    arr = np.asarray(value)
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    return arr


def to_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Torch tensors or arrays -> numpy; floating point becomes float32, integers stay."""
    if not isinstance(state_dict, Mapping):
        raise ConversionError(
            f"Expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}."
        )
    return {str(k): _to_numpy(v) for k, v in state_dict.items()}


_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


def unwrap_state_dict(obj: Any) -> Mapping[str, Any]:
    """Strip training-checkpoint wrappers: `{'model': sd}`, `{'state_dict': sd}`, EMA, `module.`.

    The EMA weights (`state_dict_ema` / `model_ema`) are preferred when present, as timm's
    loader does for evaluation. A `module.` prefix (DataParallel) is removed from every key.
    """
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"Checkpoint holds a {type(obj).__name__}, not a state_dict; save model.state_dict()."
        )
    seen = 0
    while seen < 4:
        seen += 1
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
        else:
            break
    keys = list(obj)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.pth/.pt/.bin` (torch, weights only) or `.safetensors` file -> numpy state_dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"Checkpoint file {path!r} does not exist.")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        try:
            raw: Any = load_file(path)
        except Exception as err:
            raise ConversionError(f"Cannot read safetensors file {path!r}: {err}") from err
    elif ext in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            import torch
        except ImportError:
            raise ConversionError(
                f"Reading {path!r} needs PyTorch: pip install torch (or convert the file to "
                ".safetensors first)."
            ) from None
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConversionError(f"Cannot read torch checkpoint {path!r}: {err}") from err
    else:
        raise ConversionError(
            f"Unknown checkpoint extension {ext!r} for {path!r}; use .pth, .pt, .bin or .safetensors."
        )
    return to_numpy_state_dict(unwrap_state_dict(raw))


# --------------------------------------------------------------------------------------------
# Layout transforms (PyTorch -> Flax).


def linear(weight: np.ndarray) -> np.ndarray:
    """`nn.Linear.weight` `[out, in]` -> `nn.Dense` kernel `[in, out]`."""
    return np.ascontiguousarray(np.asarray(weight).T)


def conv2d(weight: np.ndarray) -> np.ndarray:
    """`nn.Conv2d.weight` `[O, I/g, kH, kW]` -> `nn.Conv` kernel `[kH, kW, I/g, O]`."""
    return np.ascontiguousarray(np.asarray(weight).transpose(2, 3, 1, 0))


def set_path(tree: dict, path: str, value: Any) -> None:
    """Put `value` at a '/'-separated path of nested dicts, e.g. 'params/blocks_0/norm1/scale'."""
    *parents, leaf = path.split("/")
    node = tree
    for name in parents:
        node = node.setdefault(name, {})
    if leaf in node:
        raise ConversionError(f"Two checkpoint entries map to the same variable {path!r}.")
    node[leaf] = value


class TrackedStateDict(Mapping):
    """Read-only view of a state_dict that records which keys a converter read (`sd[key]`).

    Iterating over keys does not count as a read, so a converter that skips a key leaves it
    in `unused()`. Keys matching `IGNORED_KEY_PATTERNS` are never reported.
    """

    def __init__(self, state_dict: Mapping[str, Any]):
        self._sd = dict(state_dict)
        self._read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        value = self._sd[key]
        self._read.add(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)

    def __contains__(self, key: object) -> bool:
        return key in self._sd

    def unused(self) -> list[str]:
        return sorted(
            k for k in self._sd
            if k not in self._read and not any(p.search(k) for p in IGNORED_KEY_PATTERNS)
        )


# --------------------------------------------------------------------------------------------
# Final check.


def expected_shapes(model: Any, input_shape: Iterable[int]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{'params/a/b': (shape, dtype)} of `model.init` on a zero input, without computing it."""
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(tuple(input_shape), jnp.float32))
    )
    abstract = {k: v for k, v in abstract.items() if k != "intermediates"}
    return {p: (tuple(v.shape), v.dtype) for p, v in flatten(abstract).items()}


def check_variables(
    variables: Mapping[str, Any],
    model: Any,
    input_shape: Iterable[int],
    *,
    unused_keys: Iterable[str] = (),
    expected: Mapping[str, tuple] | None = None,
) -> dict[str, Any]:
    """Check converted `variables` against `jax.eval_shape(model.init, ...)`.

    Raises one `ConversionError` listing every missing, unexpected and shape-mismatched
    variable plus the state_dict keys the converter did not use. Returns the variables as
    nested dicts of numpy arrays in the model's parameter dtype. `expected` (the output of
    `expected_shapes`) skips re-tracing the model when the caller already has it.
    """
    if expected is None:
        expected = expected_shapes(model, input_shape)
    got = flatten(variables)
    problems = tree_problems(
        {p: shape for p, (shape, _) in expected.items()}, {p: tuple(np.shape(v)) for p, v in got.items()},
        names=("shape mismatches:", "missing variables:", "unexpected variables:"), limit=12,
        extra={"unused checkpoint keys:": sorted(unused_keys)})
    if problems:
        name = type(model).__name__
        raise ConversionError(
            f"Checkpoint does not match {name}: " + "; ".join(problems)
            + ". Check the model name and overrides (num_classes, img_size, depths) match the checkpoint."
        )
    return unflatten({p: np.asarray(got[p]).astype(expected[p][1]) for p in got})
