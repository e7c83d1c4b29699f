"""Matplotlib figures of attention heads: per-head maps of one query, head-similarity heatmaps.

Figures have a fixed size in pixels (``figsize * dpi``, no tight bounding box), so that a
caller (and the tests) can rely on the PNG dimensions. Uses the non-interactive Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def split_keys(num_keys: int) -> tuple[int, tuple[int, int]]:
    """(prefix tokens, key grid) of ``num_keys`` keys: a square grid after 0 or 1 prefix tokens."""
    for prefix in (0, 1):
        side = math.isqrt(num_keys - prefix)
        if side * side == num_keys - prefix and side > 0:
            return prefix, (side, side)
    raise ValueError(
        f"Cannot lay {num_keys} keys on a square grid (with 0 or 1 class token); only square "
        "key grids are drawn."
    )


def query_position(query: int, num_queries: int) -> tuple[int, int] | None:
    """(row, col) of query token ``query`` on its square grid, or None for a prefix token."""
    prefix, (_, gw) = split_keys(num_queries)
    if query < prefix:
        return None
    return divmod(query - prefix, gw)


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a small ``[h, w]`` map to ``size`` (pixel centres aligned)."""
    h, w = grid.shape
    oh, ow = size
    ys = np.clip((np.arange(oh) + 0.5) * h / oh - 0.5, 0, h - 1)
    xs = np.clip((np.arange(ow) + 0.5) * w / ow - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    g = grid.astype(np.float64)
    top = g[y0][:, x0] * (1 - wx) + g[y0][:, x1] * wx
    bot = g[y1][:, x0] * (1 - wx) + g[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def attention_grid_figure(
    image: np.ndarray,
    maps: np.ndarray,
    query: int,
    *,
    labels: Sequence[str] | None = None,
    title: str = "",
    out: str | None = None,
    dpi: int = 100,
    panel_inches: float = 2.2,
):
    """Every head's attention of token ``query`` over the key grid, overlaid on ``image``.

    ``image``: uint8 ``[H, W, 3]`` (the model input, un-normalized); ``maps``: one image's
    ``[heads, N, Nk]`` softmaxed maps. The class-token key (if any) is left out of the drawn
    grid and its weight printed in the panel title. The first panel shows the image and the
    query position. Returns the figure (saved to ``out`` when given).
    """
    plt = _plt()
    maps = np.asarray(maps, np.float64)
    if maps.ndim != 3:
        raise ValueError(f"maps must be one image's [heads, N, Nk], got shape {maps.shape}.")
    heads, n, nk = maps.shape
    if not 0 <= query < n:
        raise ValueError(f"--query {query} is out of range: this block has {n} query tokens (0..{n - 1}).")
    labels = list(labels or [f"head {i}" for i in range(heads)])
    prefix, (gh, gw) = split_keys(nk)
    panels = heads + 1
    cols = min(panels, 5)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_inches, rows * panel_inches + 0.5),
                             dpi=dpi, squeeze=False)
    h, w = image.shape[:2]
    ax = axes[0][0]
    ax.imshow(image)
    pos = query_position(query, n)
    if pos is None:
        ax.set_title(f"input, query {query} (class token)", fontsize=8)
    else:
        qh, qw = split_keys(n)[1]
        r, c = pos
        ax.add_patch(plt.Rectangle((c * w / qw - 0.5, r * h / qh - 0.5), w / qw, h / qh,
                                   fill=False, edgecolor="red", linewidth=1.5))
        ax.set_title(f"input, query {query} (row {r}, col {c})", fontsize=8)
    ax.axis("off")
    vmax = float(maps[:, query, prefix:].max()) or 1.0
    im = None
    for i in range(heads):
        ax = axes[(i + 1) // cols][(i + 1) % cols]
        grid = maps[i, query, prefix:].reshape(gh, gw)
        ax.imshow(image.mean(axis=-1), cmap="gray", vmin=0, vmax=255)
        im = ax.imshow(upsample(grid, (h, w)), cmap="inferno", alpha=0.65, vmin=0.0, vmax=vmax,
                       extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        extra = f", cls {maps[i, query, 0]:.2f}" if prefix else ""
        color = "tab:blue" if labels[i].startswith("hal") else "black"
        ax.set_title(f"{labels[i]}{extra}", fontsize=8, color=color)
        ax.axis("off")
    for j in range(panels, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title or f"attention of query {query}", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.88, top=0.86, bottom=0.03, wspace=0.08, hspace=0.25)
    cax = fig.add_axes((0.9, 0.1, 0.02, 0.7))
    fig.colorbar(im, cax=cax, label="attention weight (patch keys)")
    if out:
        fig.savefig(out, dpi=dpi)
    return fig


def similarity_figure(
    blocks: Sequence[dict],
    *,
    labels: Sequence[str] | None = None,
    title: str = "",
    out: str | None = None,
    dpi: int = 100,
    panel_inches: float = 2.4,
):
    """Head-similarity heatmaps, one per block (``blocks``: ``CCSAccumulator.result()['blocks']``).

    Each panel is the ``[h, h]`` mean cosine similarity of head pairs with the block score
    (mean over pairs ``i < j``) in its title; one shared colour bar on [0, 1].
    """
    plt = _plt()
    if not blocks:
        raise ValueError("No blocks to draw.")
    cols = min(len(blocks), 4)
    rows = math.ceil(len(blocks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_inches + 0.8, rows * panel_inches + 0.5),
                             dpi=dpi, squeeze=False)
    im = None
    for k, block in enumerate(blocks):
        ax = axes[k // cols][k % cols]
        sim = np.asarray(block["similarity"], np.float64)
        h = sim.shape[0]
        names = list(labels) if labels is not None and len(labels) == h else [str(i) for i in range(h)]
        short = [n.replace("real ", "r").replace("hal ", "h").replace("head ", "") for n in names]
        im = ax.imshow(sim, cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(h), short, fontsize=6, rotation=90)
        ax.set_yticks(range(h), short, fontsize=6)
        if h <= 8:  # print the values where they stay legible
            for i in range(h):
                for j in range(h):
                    ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=5,
                            color="white" if sim[i, j] < 0.6 else "black")
        ax.set_title(f"{block['block']}\nscore {block['score']:.3f}", fontsize=8)
    for j in range(len(blocks), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title or "head similarity per block", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.86, top=0.80, bottom=0.1, wspace=0.45, hspace=0.6)
    cax = fig.add_axes((0.89, 0.15, 0.02, 0.6))
    fig.colorbar(im, cax=cax, label="mean cosine similarity")
    if out:
        fig.savefig(out, dpi=dpi)
    return fig
