"""CCS, the contributed cosine similarity of attention heads (docs/design.md section 6; paper Table 4).

For one block with softmaxed maps ``A`` of shape ``[B, h, N, Nk]``: the similarity of heads
``i`` and ``j`` is the mean over images and query rows of the cosine similarity of the rows
``A[b, i, n]`` and ``A[b, j, n]``; the block's score is the mean over pairs ``i < j``; CCS is
the mean of the block scores. Lower means less redundant heads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from halluvit_jax.analysis.similarity import head_similarity  # noqa: F401  (part of this API)


def block_score(attn) -> float:
    """Mean over head pairs ``i < j`` of :func:`head_similarity` (NaN for a single head)."""
    s = head_similarity(attn)
    h = s.shape[0]
    if h < 2:
        return float("nan")
    iu = np.triu_indices(h, k=1)
    return float(s[iu].mean())


# --------------------------------------------------------------------------------------------
# Reading the sown maps of a model and accumulating CCS over batches.


def _natural_key(name: str):
    """'stages_1/blocks_10/attn' sorts after 'stages_1/blocks_9/attn'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def collect_attention(intermediates: Any) -> list[tuple[str, np.ndarray]]:
    """``[(block path, maps [B, h, N, Nk])]`` of every sown ``attn``, in block order.

    ``intermediates``: the 'intermediates' collection returned by
    ``model.apply(..., mutable=['intermediates'])`` (or the whole mutated-state dict).
    """
    tree = intermediates.get("intermediates", intermediates) if isinstance(intermediates, Mapping) else intermediates
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        # sow stores a tuple: [..., module, 'attn', 0]
        if len(keys) >= 2 and keys[-2] == "attn" and keys[-1] == "0":
            keys = keys[:-2]
        elif keys and keys[-1] == "attn":
            keys = keys[:-1]
        else:
            continue
        out.append(("/".join(keys), np.asarray(leaf)))
    if not out:
        raise ValueError(
            "No sown 'attn' maps in the intermediates; call model.apply(..., mutable=['intermediates']) "
            "on a model built from halluvit_jax.layers attention modules."
        )
    return sorted(out, key=lambda kv: _natural_key(kv[0]))


def attention_maps(model, variables: Mapping[str, Any], images) -> list[tuple[str, np.ndarray]]:
    """Forward ``images`` (NHWC) in eval mode and return :func:`collect_attention` of the run."""
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    return collect_attention(state)


def hal_heads(num_heads: int, hal: bool) -> list[str]:
    """Head labels in the sown order: hMHSA puts the real heads first, then the hallucinated."""
    if not hal:
        return [f"head {i}" for i in range(num_heads)]
    half = num_heads // 2
    return [f"real {i}" for i in range(half)] + [f"hal {i}" for i in range(num_heads - half)]


def is_hal_model(model) -> bool:
    """True for a model whose attention is hMHSA (a ``hal=True`` field)."""
    return bool(getattr(model, "hal", False))


class CCSAccumulator:
    """Per-block head-similarity matrices averaged over batches of any size (images weighted equally).

    ``update(blocks)`` takes :func:`collect_attention` output of one batch; ``result()`` gives
    ``{'ccs': float, 'blocks': [{'block', 'heads', 'score', 'similarity'}], 'num_images': int}``.
    """

    def __init__(self):
        self._sums: dict[str, np.ndarray] = {}
        self._order: list[str] = []
        self._count = 0

    def update(self, blocks: list[tuple[str, Any]]) -> None:
        batch = None
        for name, maps in blocks:
            maps = np.asarray(maps)
            if maps.ndim != 4:
                raise ValueError(f"Block {name}: attention maps must be [B, heads, N, Nk], got {maps.shape}.")
            if batch is None:
                batch = maps.shape[0]
            s = head_similarity(maps) * maps.shape[0]
            if name not in self._sums:
                self._sums[name] = s
                self._order.append(name)
            else:
                self._sums[name] = self._sums[name] + s
        self._count += batch or 0

    def result(self) -> dict[str, Any]:
        if not self._count:
            raise ValueError("CCSAccumulator got no images; feed it at least one batch.")
        blocks = []
        for name in self._order:
            sim = self._sums[name] / self._count
            h = sim.shape[0]
            score = float(sim[np.triu_indices(h, k=1)].mean()) if h > 1 else float("nan")
            blocks.append({"block": name, "heads": h, "score": score, "similarity": sim.tolist()})
        return {"ccs": ccs_of_scores([b["score"] for b in blocks]), "blocks": blocks,
                "num_images": self._count}


def ccs_of_scores(scores) -> float:
    """CCS: mean of the block scores (blocks with a single head, score NaN, are skipped)."""
    s = np.asarray([x for x in scores if not np.isnan(x)], np.float64)
    return float(s.mean()) if s.size else float("nan")


def ccs(blocks: list[tuple[str, Any]] | list[Any]) -> float:
    """CCS of one set of per-block maps (``[(name, maps)]`` or a list of ``[B, h, N, Nk]`` arrays)."""
    maps = [b[1] if isinstance(b, tuple) else b for b in blocks]
    return ccs_of_scores([block_score(m) for m in maps])


def model_ccs(model, variables: Mapping[str, Any], batches, *, max_images: int | None = None,
              jit: bool = True) -> dict[str, Any]:
    """CCS of ``model`` over an iterable of NHWC image batches (arrays or dicts with 'image').

    Batches may carry a 'mask' (padded eval batches): masked-out images are dropped.
    """
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}

    def fwd(v, x):
        _, state = model.apply(v, x, train=False, mutable=["intermediates"])
        return state["intermediates"]

    fwd = jax.jit(fwd) if jit else fwd
    acc = CCSAccumulator()
    seen = 0
    for batch in batches:
        mask = None
        if isinstance(batch, Mapping):
            mask = batch.get("mask")
            batch = batch["image"]
        blocks = collect_attention(fwd(variables, batch))
        if mask is not None:
            keep = np.asarray(mask).astype(bool)
            blocks = [(n, m[keep]) for n, m in blocks]
        if max_images is not None:
            blocks = [(n, m[: max_images - seen]) for n, m in blocks]
        if blocks and blocks[0][1].shape[0]:
            acc.update(blocks)
            seen += blocks[0][1].shape[0]
        if max_images is not None and seen >= max_images:
            break
    return acc.result()
