"""Device mesh, parameter shardings from logical axis names, and batch placement (jax.jit +
NamedSharding; no pmap).

The mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism
whose members also split the parameters and optimizer state) and ``model`` (tensor parallelism
over attention heads, MLP hidden units and cFFN inner units). The batch is split over
``('data', 'fsdp')``.

The layers name the logical axes of their variables (`halluvit_jax.layers.axes`: ``embed``,
``mlp``, ``compact``, ``heads``, ...); `logical_axes` collects a model's. Every leaf of the train
state whose path ends with a variable's path (the parameter, its optimizer moments, its EMA
copy, BatchNorm statistics) is laid out by, in order:

1. Explicit rules from the config (regex on the '/'-joined path, first match wins), e.g.
   ``('pos_embed', 'replicate')`` or ``('head/kernel', (None, 'model'))``.
2. `LOGICAL_RULES`: the mesh axes each logical name may be split over; a dimension takes the
   first one not yet used by the leaf that divides it. So ``fc1`` (``embed, mlp``) is
   column-parallel and ``fc2`` (``mlp, embed``) row-parallel; the cFFN's ``fc2a``
   (``branch, mlp, compact``) is row-parallel after ``fc1`` and ``fc2b`` (``branch, compact,
   embed``) row-parallel over c'.
3. FSDP: the largest still-unsharded dimension divisible by the ``fsdp`` axis size, for leaves of
   at least ``fsdp_min_size`` elements. Everything else is replicated.

Attention projections are stored joined (``qkv``: q | k | v, of unequal widths in hMHSA) on the
``qkv`` axis, which no rule splits: a contiguous cut of it would cut across the parts. The
forward pass reads them per part and per head (`halluvit_jax.layers.attention.per_head_views`);
inside `axis_rules` those views are laid out by the same table, so that every ``model`` shard
holds whole heads of q, k and v (where the head count divides) and the matching rows of ``proj``.
Steps jitted through `with_axis_rules` trace inside it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from halluvit_jax.layers import axes
from halluvit_jax.layers.axes import path_str

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> the mesh axes it may be split over, in order of preference. Names not
# listed ("embed", "qkv", "branch", "head_dim", "classes") are split only by the FSDP rule.
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("heads", ("model",)),
    ("mlp", ("model",)),
    ("compact", ("model",)),
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


# XLA's SPMD partitioners (`jax_use_shardy_partitioner`). "auto" keeps JAX's setting except on
# meshes that split both ``fsdp`` and ``model``: there Shardy (JAX's default) computed wrong values
# for hal train steps with jax 0.10.2 (PVTv2-b0-hal's loss), GSPMD the 1-device ones
# (tests/test_train_sharding.py), so "auto" takes GSPMD on such meshes.
PARTITIONERS = ("auto", "shardy", "gspmd")


def partitioner_for(mesh: Mesh, choice: str = "auto") -> str:
    """The partitioner (``"shardy"`` or ``"gspmd"``) to compile the programs of ``mesh`` with;
    ``choice`` is ``config.mesh.partitioner`` (see `PARTITIONERS`)."""
    if choice not in PARTITIONERS:
        raise ValueError(f"mesh.partitioner must be one of {PARTITIONERS}, got {choice!r}; "
                         "set --config.mesh.partitioner=auto.")
    if choice != "auto":
        return choice
    if mesh.shape.get("fsdp", 1) > 1 and mesh.shape.get("model", 1) > 1:
        return "gspmd"
    return "shardy" if jax.config.jax_use_shardy_partitioner else "gspmd"


@contextlib.contextmanager
def use_partitioner(name: str) -> Iterator[None]:
    """Within: ``jax.jit`` lowers with ``name``'s partitioner (``"shardy"`` or ``"gspmd"``;
    the setting is part of jit's cache key, so calls of a compiled step must stay inside too).
    Restores the previous setting on exit."""
    if name not in ("shardy", "gspmd"):
        raise ValueError(f"Unknown partitioner {name!r}: 'shardy' or 'gspmd'.")
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", name == "shardy")
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


def _explicit_spec(rule: Any, ndim: int) -> P:
    if rule in ("replicate", "replicated", None):
        return P()
    if isinstance(rule, str):
        rule = tuple(None if a in ("", "none", "None") else a for a in rule.split(","))
    rule = tuple(rule)
    if len(rule) > ndim:
        raise ValueError(f"Sharding rule {rule} has more entries than the leaf's {ndim} dims.")
    return P(*rule)


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> list[Any]:
    """The mesh axis (or None) of every dimension named ``names``, by `LOGICAL_RULES`: the first
    mesh axis of a name's list that is larger than 1, not used by an earlier dimension and
    divides the dimension's size."""
    table, used, spec = dict(LOGICAL_RULES), set(), []
    for name, size in zip(names, shape):
        axis = next((a for a in table.get(name, ()) if a not in used
                     and mesh.shape.get(a, 1) > 1 and size % mesh.shape[a] == 0), None)
        used.add(axis)
        spec.append(axis)
    return spec


def infer_partition_spec(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    *,
    names: Sequence[str | None] | None = None,
    rules: Sequence[tuple[str, Any]] = (),
    fsdp_min_size: int = 2**14,
) -> P:
    """PartitionSpec of one leaf from its path, shape and logical axis ``names`` (None: not
    declared; see the module docstring)."""
    ndim = len(shape)
    for pattern, rule in rules:
        if re.search(pattern, path):
            return _explicit_spec(rule, ndim)
    if ndim == 0:
        return P()
    spec = logical_to_mesh(names, shape, mesh) if names is not None and len(names) == ndim \
        else [None] * ndim
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and math.prod(shape) >= fsdp_min_size:
        free = [i for i in range(ndim) if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def logical_axes(model: nn.Module, image_size: int) -> dict[str, tuple[str | None, ...]]:
    """The logical axes the layers of ``model`` (an image classifier on NHWC RGB images of
    ``image_size``) declare: `halluvit_jax.layers.axes.logical_axes`."""
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return axes.logical_axes(model, image)


def _names_of(path: str, table: dict[str, tuple[str | None, ...]]) -> tuple[str | None, ...] | None:
    """The names of the longest suffix of ``path`` that is a variable's path in ``table``."""
    parts = path.split("/")
    return next((table[key] for key in ("/".join(parts[i:]) for i in range(len(parts)))
                 if key in table), None)


def infer_shardings(
    abstract_tree: Any,
    mesh: Mesh,
    *,
    logical_axes: dict[str, tuple[str | None, ...]] | None = None,
    rules: Sequence[tuple[str, Any]] = (),
    fsdp_min_size: int = 2**14,
) -> Any:
    """NamedSharding for every leaf of an abstract (``jax.eval_shape``) pytree; ``logical_axes``:
    the model's (`logical_axes`; None: no tensor parallelism, only the explicit and FSDP rules)."""
    table = logical_axes or {}

    def one(path, leaf):
        p = path_str(path)
        spec = infer_partition_spec(p, tuple(leaf.shape), mesh, names=_names_of(p, table),
                                    rules=rules, fsdp_min_size=fsdp_min_size)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


@contextlib.contextmanager
def axis_rules(mesh: Mesh) -> Iterator[None]:
    """Within: the forward passes lay out the views they ask for (`halluvit_jax.layers.axes.
    constrain`) on ``mesh`` by `LOGICAL_RULES` (nothing to lay out without a ``model`` axis), and
    kernels XLA cannot partition run per batch shard (`halluvit_jax.layers.axes.
    per_batch_shard`)."""
    with axes.device_mesh(mesh, BATCH_AXES):
        if mesh.shape.get("model", 1) == 1:
            yield
            return

        def layout(names, shape):
            return NamedSharding(mesh, P(*logical_to_mesh(names, shape, mesh)))

        with axes.sharding_rules(layout):
            yield


def with_axis_rules(mesh: Mesh, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` traced inside `axis_rules` (wrap a step before ``jax.jit``)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with axis_rules(mesh):
            return fn(*args, **kwargs)

    return wrapped


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
