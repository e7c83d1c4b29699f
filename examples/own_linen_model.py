"""Use hMHSA (`HalAttention`) and cFFN (`CompactMlp`) inside your own Linen model.

    python examples/own_linen_model.py

`TinyHalClassifier` is a user-written classifier (not one of the registered backbones): a conv
stem to a token grid, pre-norm blocks of `HalAttention` + `CompactMlp`, mean pooling, a head.
The pieces to get right:

- `HalAttention` needs the key grid: pass `kv_grid=(H, W)` (and `num_prefix_tokens` when class
  tokens precede the grid); its `num_heads` must be even (half real, half hallucinated).
- `CompactMlp` trains with BatchNorm in each branch: call it with `train=True` and
  `mutable=['batch_stats']`, and keep the returned statistics.
- For inference fold the branches with `halluvit_jax.reparameterize` and build the same model
  with `deploy=True`; both give the same eval outputs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from halluvit_jax import reparameterize
from halluvit_jax.layers import CompactMlp, HalAttention


class HalBlock(nn.Module):
    """Pre-norm block: `x + hMHSA(LN(x))`, `x + cFFN(LN(x))` on a token grid."""

    dim: int
    num_heads: int
    grid: tuple[int, int]
    deploy: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        y = HalAttention(self.dim, self.num_heads, name="attn")(
            nn.LayerNorm(name="norm1")(x), kv_grid=self.grid, num_prefix_tokens=0, train=train
        )
        x = x + y
        y = CompactMlp(4 * self.dim, deploy=self.deploy, name="mlp")(nn.LayerNorm(name="norm2")(x), train=train)
        return x + y


class TinyHalClassifier(nn.Module):
    """4x4-patch stem -> `depth` HalBlocks -> mean pool -> linear head, on NHWC images."""

    num_classes: int = 10
    dim: int = 32
    depth: int = 2
    num_heads: int = 4
    deploy: bool = False

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        x = nn.Conv(self.dim, (4, 4), strides=(4, 4), name="stem")(images)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        for i in range(self.depth):
            x = HalBlock(self.dim, self.num_heads, (h, w), deploy=self.deploy, name=f"block{i}")(x, train=train)
        return nn.Dense(self.num_classes, name="head")(nn.LayerNorm(name="norm")(x).mean(axis=1))


def main(steps: int = 5, depth: int = 2) -> dict[str, float]:
    """A few training steps, then fold into the deploy form and compare eval logits."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=16))
    model = TinyHalClassifier(depth=depth)
    variables = model.init(jax.random.key(0), images)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), updates["batch_stats"], opt_state, loss

    losses = []
    for _ in range(steps):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))

    trained = {"params": params, "batch_stats": batch_stats}
    eval_logits = jax.jit(model.apply)(trained, images)  # training form, eval mode (running stats)
    deployed = reparameterize(jax.device_get(trained))
    deploy_logits = jax.jit(TinyHalClassifier(depth=depth, deploy=True).apply)(deployed, images)
    rel = float(jnp.abs(eval_logits - deploy_logits).max() / jnp.abs(eval_logits).max())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; deploy vs training form: max rel diff {rel:.1e}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "deploy_rel_diff": rel}


if __name__ == "__main__":
    main()
