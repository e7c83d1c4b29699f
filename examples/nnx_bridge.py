"""Use a halluvit-jax (Linen) model from Flax NNX code through `flax.nnx.bridge`.

    python examples/nnx_bridge.py

`nnx.bridge.ToNNX` wraps the Linen model into a stateful NNX module; `lazy_init` creates its
variables from a sample input, and `load_linen_variables` below copies trained / converted Linen
variables (`{'params', 'batch_stats'}`, e.g. `halluvit_jax.load(path).variables`) into it.
Calls take the Linen keyword arguments (`train=False`); in train mode pass
`mutable=['batch_stats']` (cFFN BatchNorm) and the wrapper keeps the updated statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import halluvit_jax as hv


def to_nnx(linen_model, sample_input, *, seed: int = 0) -> nnx.Module:
    """A stateful NNX module wrapping `linen_model`, initialized on `sample_input`."""
    return nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(seed)).lazy_init(sample_input)


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Copy Linen variables (all collections but 'intermediates') into a `ToNNX` module in place.

    NNX keeps one tree per module path with typed variables (`nnx.Param`, `nnx.BatchStat`), so
    each Linen leaf `variables[collection][a][b]...` goes to `state[a][b]...`.
    """
    state = nnx.state(model)

    def put(tree: Mapping[str, Any], node, path: tuple[str, ...]):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                put(value, node[key], path + (key,))
                continue
            leaf = node[key]
            current = leaf.get_value()
            if tuple(np.shape(value)) != tuple(current.shape):
                raise ValueError(f"{'/'.join(path + (key,))}: shape {np.shape(value)} vs {current.shape}.")
            leaf.set_value(jnp.asarray(value, current.dtype))

    for collection, tree in variables.items():
        if collection != "intermediates":
            put(tree, state, ())
    nnx.update(model, state)
    return model


def main() -> dict[str, float]:
    """Wrap a small deit_tiny_hal, load Linen variables into it, and compare the outputs."""
    linen_model = hv.create_model(
        "deit_tiny_hal", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4, num_classes=10
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    variables = linen_model.init(jax.random.key(42), x)  # stand-in for a trained checkpoint
    reference = jax.jit(linen_model.apply)(variables, x)  # eval-mode logits, Linen
    ref_features = jax.jit(lambda v, x: linen_model.apply(v, x, method="forward_features"))(variables, x)

    model = load_linen_variables(to_nnx(linen_model, x, seed=7), variables)
    # NNX code treats it like any NNX module, e.g. under nnx.jit (eval mode: train=False default).
    logits = nnx.jit(lambda m, x: m(x))(model, x)
    features = nnx.jit(lambda m, x: m(x, method="forward_features"))(model, x)
    err = float(jnp.abs(logits - reference).max())
    err_features = float(jnp.abs(features - ref_features).max())
    print(f"NNX vs Linen: max |diff| logits {err:.2e}, features {err_features:.2e} {features.shape}")
    return {"max_abs_diff": err, "max_abs_diff_features": err_features}


if __name__ == "__main__":
    main()
