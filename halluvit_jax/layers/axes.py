"""Logical axis names of the layers' parameters (maxtext style), and where the forward pass asks
for a layout.

Every layer names the dimensions of the variables it creates when it creates them (`param`,
`variable`). The names say what a dimension is, never how it is laid out:

- ``"embed"``: the model width C (token features in and out of a block);
- ``"mlp"``: an FFN's hidden width mC; ``"compact"``: a cFFN factor's inner width c';
- ``"branch"``: a `RepDense`'s training-time branches;
- ``"qkv"``: a flat head-major feature axis (the output of the ``q``, ``kv`` or ``qkv``
  projection, the input of ``proj``); ``"heads"`` and ``"head_dim"``: the same axis read per
  head (`constrain`, in the attention's forward pass);
- ``"classes"``: the classifier's outputs.

`halluvit_jax.train.sharding` maps names to mesh axes through one rules table. The variables a
model creates stay plain arrays: the names are recorded only while `logical_axes` traces the
model's ``init`` (as flax `LogicallyPartitioned` boxes, unboxed into a table right away), and
`constrain` lays an array out only inside `sharding_rules` (which `halluvit_jax.train.sharding`
enters); anywhere else both are no-ops.

A kernel that XLA cannot partition (a Pallas/Mosaic custom call) runs per batch shard through
`per_batch_shard`, which reads the device mesh that `device_mesh` (entered by
`halluvit_jax.train.sharding.axis_rules`) declares.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax

Axes = Sequence[str | None]

_RECORDING = contextvars.ContextVar("halluvit_axes_recording", default=False)
# names, shape -> a jax.sharding.Sharding (or None: no constraint), while sharding rules apply.
_LAYOUT: contextvars.ContextVar[Callable[[Axes, tuple[int, ...]], Any] | None] = \
    contextvars.ContextVar("halluvit_axes_layout", default=None)
# (mesh, the mesh axes the batch is split over), while a step traces for a mesh.
_MESH: contextvars.ContextVar[tuple[Any, tuple[str, ...]] | None] = \
    contextvars.ContextVar("halluvit_axes_mesh", default=None)


def _check(name: str, shape: Sequence[int], names: Axes) -> tuple[str | None, ...]:
    if len(names) != len(shape):
        raise ValueError(f"Variable {name!r} of shape {tuple(shape)} declares axes {tuple(names)}.")
    return tuple(names)


def param(module: nn.Module, name: str, init: Callable[..., Any], shape: Sequence[int], dtype: Any,
          names: Axes) -> jax.Array:
    """``module.param(name, init, shape, dtype)`` whose dimensions are named ``names``."""
    names = _check(name, shape, names)
    if _RECORDING.get():
        init = nn.with_logical_partitioning(init, names)
    return module.param(name, init, tuple(shape), dtype)


def variable(module: nn.Module, collection: str, name: str, init: Callable[[tuple[int, ...]], Any],
             shape: Sequence[int], names: Axes) -> nn.Variable:
    """``module.variable(collection, name, init, shape)`` whose dimensions are named ``names``."""
    names = _check(name, shape, names)
    if _RECORDING.get():
        plain = init
        init = lambda s: nn.LogicallyPartitioned(plain(s), names)  # noqa: E731
    return module.variable(collection, name, init, tuple(shape))


def path_str(path: Sequence[Any]) -> str:
    """A jax key path as ``'params/blocks_0/attn/qkv/kernel'``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def logical_axes(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, tuple[str | None, ...]]:
    """The declared logical axes of the variables ``model.init(rng, *args, **kwargs)`` creates:
    ``{'blocks_0/attn/qkv/kernel': ('embed', 'qkv'), ...}`` (paths without the collection name;
    variables created by stock flax layers, e.g. ``nn.Conv``, have no entry). Traced abstractly
    (`jax.eval_shape`): ``args`` may be `jax.ShapeDtypeStruct`s."""
    token = _RECORDING.set(True)
    try:
        init = functools.partial(model.init, **kwargs)
        boxed = jax.eval_shape(init, jax.random.key(0), *args)
    finally:
        _RECORDING.reset(token)
    is_box = lambda v: isinstance(v, nn.LogicallyPartitioned)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]
    return {path_str(path[1:]): tuple(v.names) for path, v in flat if is_box(v)}


@contextlib.contextmanager
def sharding_rules(layout: Callable[[Axes, tuple[int, ...]], Any]) -> Iterator[None]:
    """Within: `constrain` lays arrays out as ``layout(names, shape)`` says (a
    `jax.sharding.Sharding`, or None for no constraint). `halluvit_jax.train.sharding.axis_rules`
    is the one caller."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def constrain(x: jax.Array, names: Axes) -> jax.Array:
    """``x`` with its dimensions ``names`` laid out as the active sharding rules map them (see
    `sharding_rules`); ``x`` itself outside them."""
    layout = _LAYOUT.get()
    if layout is None:
        return x
    sharding = layout(_check("constrained array", x.shape, names), tuple(x.shape))
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def constrain_view(x: jax.Array, shape: Sequence[int], names: Axes) -> jax.Array:
    """`constrain` applied to the view of ``x`` as ``shape`` (a reshape, e.g. a ``[C, h*d]``
    kernel read as ``[C, h, d]``), returned in ``x``'s shape; ``x`` itself outside sharding rules."""
    if _LAYOUT.get() is None:
        return x
    return constrain(x.reshape(shape), names).reshape(x.shape)


@contextlib.contextmanager
def device_mesh(mesh: Any, batch_axes: Sequence[str]) -> Iterator[None]:
    """Within: the program being traced runs on ``mesh`` (a `jax.sharding.Mesh`) with its batch
    split over ``batch_axes``; `per_batch_shard` reads it. `halluvit_jax.train.sharding.
    axis_rules` is the one caller."""
    token = _MESH.set((mesh, tuple(batch_axes)))
    try:
        yield
    finally:
        _MESH.reset(token)


def mesh_beyond_batch() -> bool:
    """Whether the program being traced runs (inside `device_mesh`) on a mesh with an axis of
    size > 1 besides its batch axes (``model``), over which batch-split arrays are replicated."""
    ctx = _MESH.get()
    if ctx is None:
        return False
    mesh, batch_axes = ctx
    return any(size > 1 for name, size in mesh.shape.items() if name not in batch_axes)


def batch_shards() -> int:
    """Into how many shards the program being traced (inside `device_mesh`) splits its batch:
    the product of the batch axes' sizes; 1 elsewhere."""
    ctx = _MESH.get()
    if ctx is None:
        return 1
    mesh, batch_axes = ctx
    return math.prod(mesh.shape[name] for name in batch_axes)


def per_batch_shard(fn: Callable[..., Any], batch_dims: Sequence[int | None],
                    out_batch_dims: int | Sequence[int | None] = 0) -> Callable[..., Any]:
    """``fn`` run on each data-parallel shard of its batch, for kernels XLA's partitioner cannot
    split (Pallas/Mosaic custom calls: "Mosaic kernels cannot be automatically partitioned").

    Inside `device_mesh` on more than one device, ``fn(*args)`` becomes a `jax.shard_map` over
    the mesh: each argument split over the batch axes along its ``batch_dims`` entry, or, where
    that is None (pytrees of weights), replicated, so every device runs ``fn`` on its own rows.
    Outputs: with an int ``out_batch_dims``, ``fn``'s output (every leaf) split along that axis;
    with a sequence, one entry per output of ``fn`` (a tuple), where None marks a sum over the
    rows, which is summed over the batch axes. Arrays split over other mesh axes (heads over
    ``model``) are gathered first; the weights' gradients are summed over the batch shards by
    shard_map's transpose. Elsewhere ``fn`` itself."""

    def spec(dim, batch_axes):
        return jax.sharding.PartitionSpec() if dim is None else jax.sharding.PartitionSpec(*(None,) * dim, batch_axes)

    @functools.wraps(fn)
    def wrapped(*args):
        ctx = _MESH.get()
        if ctx is None or ctx[0].size == 1:
            return fn(*args)
        mesh, batch_axes = ctx
        in_specs = tuple(spec(d, batch_axes) for d in batch_dims)
        if isinstance(out_batch_dims, int):
            body, out_specs = fn, spec(out_batch_dims, batch_axes)
        else:
            def body(*a):
                return tuple(o if d is not None else jax.lax.psum(o, batch_axes)
                             for o, d in zip(fn(*a), out_batch_dims))
            out_specs = tuple(spec(d, batch_axes) for d in out_batch_dims)
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

    return wrapped
