"""Checks and reshapes of variable trees (nested dicts of arrays), shared by the loader, resume,
``init_from`` and the converters: the ``'/'``-joined path layout, structure/shape comparison
and finiteness."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from halluvit_jax.checkpoint.errors import CheckpointMismatchError


def key_name(k: Any) -> str:
    """The name of one step of a ``jax.tree_util`` key path (dict key, attribute or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def host_numpy(tree: Any) -> Any:
    """Nested mappings of arrays -> nested dicts (string keys) of host numpy arrays."""
    if isinstance(tree, Mapping):
        return {str(k): host_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{'params/blocks_0/attn/qkv/kernel': shape}`` of any pytree of arrays, array metadata
    or ``ShapeDtypeStruct`` (dict keys, attribute names and sequence indices alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, (dict, list, tuple)))[0]
    out = {}
    for path, leaf in leaves:
        shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
        out["/".join(key_name(k) for k in path)] = tuple(int(d) for d in shape)
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
            return "/".join(key_name(k) for k in path)
    return None


def all_finite(tree: Any) -> jax.Array:
    """One fused reduction: True iff every floating leaf of ``tree`` is finite (jit-able)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


# Checksums of saved values: orbax's array chunks carry none, so a flipped bit inside a chunk
# would otherwise read back as a changed value without any error.


def _uint_bits(x: Any, xp: Any) -> Any:
    """The elements' bit patterns as unsigned integers of their width, widened to uint32."""
    width = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32}[np.dtype(x.dtype).itemsize]
    if xp is np:
        return np.ascontiguousarray(x).view(width).astype(np.uint32)
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def value_checksums(tree: Any) -> dict[str, int]:
    """``{path: checksum}`` of a pytree of host arrays: the sum of each leaf's element bit patterns
    modulo 2**32, so a change of any one element always changes it (paths as in :func:`flat_shapes`)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = np.asarray(leaf)  # as jit sees it (a saved Python int is int64 on disk, int32 in jax)
        bits = _uint_bits(leaf.astype(jax.dtypes.canonicalize_dtype(leaf.dtype), copy=False), np)
        out["/".join(key_name(k) for k in path)] = int(np.sum(bits, dtype=np.uint64) % 2**32)
    return out


def _device_checksums(tree: Any) -> dict[str, jax.Array]:
    return {"/".join(key_name(k) for k in path): jnp.sum(_uint_bits(leaf, jnp), dtype=jnp.uint32)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


_device_checksums_jit = jax.jit(_device_checksums)


def device_checksums(tree: Any) -> dict[str, int]:
    """:func:`value_checksums` of device arrays on any sharding (uint32 sums wrap the same way)."""
    return {k: int(v) for k, v in jax.device_get(_device_checksums_jit(tree)).items()}


def has_training_branches(params: Any) -> bool:
    """cFFN in training form (parallel ``branch_kernel``s) rather than folded for deployment."""
    return any("branch_kernel" in p for p in flat_shapes(params))
