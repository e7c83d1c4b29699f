"""On-device Mixup / CutMix with label smoothing (timm ``Mixup`` semantics, batch mode), in JAX.

Per call (one batch): with probability ``prob`` the batch is mixed; if both alphas are > 0,
CutMix is chosen with probability ``switch_prob``, else Mixup. One ``lam ~ Beta(alpha, alpha)``
is drawn per batch and every example ``x[i]`` is paired with ``x[B-1-i]`` (timm's
``x.flip(0)``):

* Mixup: ``x = lam * x + (1 - lam) * x[::-1]``;
* CutMix: a box of size ``int(H*sqrt(1-lam)) x int(W*sqrt(1-lam))`` centered at a uniform
  random pixel (clipped to the image) is pasted from ``x[::-1]``, and ``lam`` is corrected to
  ``1 - box_area / (H*W)`` (timm ``correct_lam=True``);
* targets: ``lam * smooth(y) + (1 - lam) * smooth(y[::-1])`` with
  ``smooth(y) = one_hot(y) * (1 - s) + s / num_classes``.

Everything is ``jit``-able (static ``num_classes`` and hyper-parameters). Apply it to the batch
the loss is computed on (the global batch, or a per-device shard: timm mixes per-GPU batches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """One-hot with label smoothing: ``on = 1 - s + s/K``, ``off = s/K`` (timm convention)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


def mixup_cutmix_params(rng: jax.Array, image_shape, *, mixup_alpha: float, cutmix_alpha: float,
                        switch_prob: float, prob: float = 1.0) -> dict[str, jax.Array]:
    """Samples the per-batch parameters: ``lam`` (corrected), ``use_cutmix``, ``apply``, box.

    Box is ``(yl, yh, xl, xh)`` (half-open) and only meaningful when ``use_cutmix``.
    """
    H, W = int(image_shape[-3]), int(image_shape[-2])
    k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(rng, 6)
    enabled = mixup_alpha > 0.0 or cutmix_alpha > 0.0
    apply = jnp.logical_and(enabled, jax.random.uniform(k_apply) < prob)
    if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0.0)
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0.0 else jnp.float32(1.0)
    lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0.0 else jnp.float32(1.0)
    lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
    # timm rand_bbox: cut = int(size * sqrt(1 - lam)), center uniform, clip to the image.
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(H * ratio).astype(jnp.int32)
    cut_w = jnp.floor(W * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, H)
    cx = jax.random.randint(k_x, (), 0, W)
    yl, yh = jnp.clip(cy - cut_h // 2, 0, H), jnp.clip(cy + cut_h // 2, 0, H)
    xl, xh = jnp.clip(cx - cut_w // 2, 0, W), jnp.clip(cx + cut_w // 2, 0, W)
    lam_corrected = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / float(H * W)
    use_cutmix = jnp.logical_and(apply, use_cutmix)
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_corrected, lam), 1.0)
    return {"lam": lam, "use_cutmix": use_cutmix, "apply": apply,
            "box": jnp.stack([yl, yh, xl, xh])}


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1, prob: float = 1.0):
    """Mixes an NHWC batch; returns ``(images, soft_targets [B, num_classes])``.

    With both alphas 0 (or ``prob=0``) this reduces to ``(images, smooth_one_hot(labels))``.
    """
    p = mixup_cutmix_params(rng, images.shape, mixup_alpha=mixup_alpha,
                            cutmix_alpha=cutmix_alpha, switch_prob=switch_prob, prob=prob)
    H, W = images.shape[-3], images.shape[-2]
    flipped = images[::-1]
    lam = p["lam"]
    yl, yh, xl, xh = p["box"]
    iy = jnp.arange(H)[:, None]
    ix = jnp.arange(W)[None, :]
    in_box = (iy >= yl) & (iy < yh) & (ix >= xl) & (ix < xh)  # [H, W]
    cut = jnp.where(in_box[None, :, :, None], flipped, images)
    mixed = (images.astype(jnp.float32) * lam + flipped.astype(jnp.float32) * (1.0 - lam))
    out = jnp.where(p["use_cutmix"], cut, mixed.astype(images.dtype))
    out = jnp.where(p["apply"], out, images)
    y = smooth_one_hot(labels, num_classes, label_smoothing)
    targets = y * lam + y[::-1] * (1.0 - lam)
    return out, targets
