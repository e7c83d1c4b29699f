"""Device mesh, parameter sharding rules and batch placement (jax.jit + NamedSharding; no pmap).

The mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism
whose members also split the parameters and optimizer state) and ``model`` (tensor parallelism
over attention heads and MLP hidden units). The batch is split over ``('data', 'fsdp')``.

Parameter shardings come from (regex, spec) rules on the '/'-joined path of every leaf of the
train state, so that optimizer moments and EMA copies inherit the rule of their parameter:

1. Explicit rules from the config (first match wins), e.g. ``('pos_embed', 'replicate')`` or
   ``('head/kernel', (None, 'model'))``.
2. Tensor parallelism: column-parallel ``qkv|q|kv|fc1`` (output features over ``model``) and
   row-parallel ``proj|fc2`` (input features over ``model``), where the dimension divides.
3. FSDP: the largest still-unsharded dimension divisible by the ``fsdp`` axis size, for leaves of
   at least ``fsdp_min_size`` elements. Everything else is replicated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# (regex, mesh axis, dimension) for tensor parallelism over heads / MLP hidden units.
TENSOR_PARALLEL_RULES: tuple[tuple[str, str, int], ...] = (
    (r"(^|/)(qkv|q|kv|fc1)/kernel$", "model", -1),
    (r"(^|/)(qkv|q|kv|fc1)/bias$", "model", -1),
    (r"(^|/)(proj|fc2)/kernel$", "model", -2),
)


def create_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'model') mesh over all devices; one axis size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    num = int(mesh_config.get("num_devices", -1) or -1) if hasattr(mesh_config, "get") else -1
    if num > 0:  # a subset of the devices (debugging, equivalence tests); single process only
        if num > len(devices):
            raise ValueError(f"mesh.num_devices={num} but only {len(devices)} devices exist.")
        devices = devices[:num]
    sizes = [int(mesh_config.get(a, 1)) if hasattr(mesh_config, "get") else 1 for a in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got mesh {dict(zip(MESH_AXES, sizes))}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if len(devices) % known:
            raise ValueError(
                f"Mesh {dict(zip(MESH_AXES, sizes))} does not divide the {len(devices)} devices; "
                "change config.mesh."
            )
        sizes[unknown[0]] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{len(devices)} are available; set one axis of config.mesh to -1."
        )
    try:
        dev_array = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # noqa: BLE001 - non-TPU topologies: a plain reshape is as good.
        dev_array = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(dev_array, MESH_AXES)


def path_str(path) -> str:
    """A jax key path as 'params/blocks_0/attn/qkv/kernel'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _explicit_spec(rule: Any, ndim: int) -> P:
    if rule in ("replicate", "replicated", None):
        return P()
    if isinstance(rule, str):
        rule = tuple(None if a in ("", "none", "None") else a for a in rule.split(","))
    rule = tuple(rule)
    if len(rule) > ndim:
        raise ValueError(f"Sharding rule {rule} has more entries than the leaf's {ndim} dims.")
    return P(*rule)


def infer_partition_spec(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, Any]] = (),
    fsdp_min_size: int = 2**14,
) -> P:
    """PartitionSpec of one leaf from its path and shape (see the module docstring)."""
    ndim = len(shape)
    for pattern, rule in rules:
        if re.search(pattern, path):
            return _explicit_spec(rule, ndim)
    if ndim == 0:
        return P()
    spec: list[Any] = [None] * ndim
    model = mesh.shape.get("model", 1)
    if model > 1:
        for pattern, axis, dim in TENSOR_PARALLEL_RULES:
            if re.search(pattern, path) and shape[dim] % model == 0:
                spec[dim] = axis
                break
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and math.prod(shape) >= fsdp_min_size:
        free = [i for i in range(ndim) if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def infer_shardings(
    abstract_tree: Any, mesh: Mesh, *, rules: Sequence[tuple[str, Any]] = (), fsdp_min_size: int = 2**14
) -> Any:
    """NamedSharding for every leaf of an abstract (``jax.eval_shape``) pytree."""

    def one(path, leaf):
        spec = infer_partition_spec(
            path_str(path), tuple(leaf.shape), mesh, rules=rules, fsdp_min_size=fsdp_min_size
        )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel axes ('data', 'fsdp')."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local batch (this process's rows) -> global arrays split over ('data', 'fsdp')."""
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map(put, batch)


def describe(shardings: Any, abstract_tree: Any, max_lines: int = 40) -> str:
    """Human-readable 'path shape spec' table of the largest leaves (for the log)."""
    rows = []
    flat_s = jax.tree_util.tree_leaves_with_path(shardings)
    flat_a = jax.tree_util.tree_leaves(abstract_tree)
    for (path, s), a in zip(flat_s, flat_a):
        rows.append((math.prod(a.shape), path_str(path), tuple(a.shape), s.spec))
    rows.sort(key=lambda r: -r[0])
    return "\n".join(f"  {p:60s} {sh!s:20s} {spec}" for _, p, sh, spec in rows[:max_lines])
