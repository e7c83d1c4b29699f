"""How alike the attention maps of two heads are: the head similarity behind CCS
(docs/design.md section 6), used by `halluvit_jax.analysis.ccs` and by the hal conversion
(`halluvit_jax.convert.hal`, which keeps the least similar heads as real heads)."""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def head_similarity(attn) -> np.ndarray:
    """``[h, h]`` matrix of mean row-wise cosine similarities between heads of ``attn``.

    ``attn``: ``[B, h, N, Nk]`` or ``[h, N, Nk]`` attention maps (any non-negative rows).
    Computed in float64 on the host.
    """
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"attention maps must be [B, heads, N, Nk] or [heads, N, Nk], got shape {a.shape}.")
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), _EPS)
    # cos[b, i, j, n] averaged over b and n.
    return np.einsum("bink,bjnk->ij", a, a) / (a.shape[0] * a.shape[2])
