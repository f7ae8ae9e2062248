"""PNG heatmaps of an Explanation (matplotlib, Agg backend: no display needed).

Left: the focus token's attention in every layer and head (plus each layer's average), later tokens masked.
Right, when the prompt is short enough to carry every token's rows: the chosen head's whole attention matrix.
"""

from __future__ import annotations

from pathlib import Path

from potion.errors import require
from potion.explain.schema import Explanation
from potion.formats.fileio import atomic_write

MAX_COLUMNS = 64  # tokens drawn with their labels; longer prompts show the window that ends at the focus


def save_png(e: Explanation, path: str | Path) -> None:
    matplotlib = require("matplotlib", "plot", "a PNG heatmap (--png)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    T = len(e.tokens)
    first = max(0, e.focus + 1 - MAX_COLUMNS)
    last = min(T, first + MAX_COLUMNS)  # exclusive; masked tokens after the focus as room allows
    labels = [f"{t.index}:{t.label[:8]}" for t in e.tokens[first:last]]
    rows, names = [], []
    for layer in range(e.model.n_layer):
        for head in range(e.model.n_head):
            rows.append(e.head_attention(layer, head).weights)
            names.append(f"L{layer} H{head}")
        rows.append(e.head_averages[layer].weights)
        names.append(f"L{layer} average")
    grid = np.full((len(rows), last - first), np.nan)
    for r, weights in enumerate(rows):
        visible = weights[first : e.focus + 1]
        grid[r, : len(visible)] = visible  # columns after the focus stay NaN: masked

    full = e.matrices is not None
    width = 3 + 0.28 * (last - first)
    fig, axes = plt.subplots(
        1, 2 if full else 1, figsize=(width * (2 if full else 1), 1.5 + 0.3 * len(rows)), squeeze=False
    )
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#dddddd")  # masked (future) positions
    ax = axes[0, 0]
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xticks(range(last - first), labels, rotation=90, fontsize=8)
    ax.set_title(f"attention of token {e.focus} '{e.tokens[e.focus].label}' (grey = masked future)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, label="attention weight")

    if full:
        n = min(T, MAX_COLUMNS)
        matrix = np.full((n, n), np.nan)
        for i, row in enumerate(e.matrices.weights[e.layer][e.head][:n]):
            matrix[i, : len(row)] = row
        ax = axes[0, 1]
        ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        names = [f"{t.index}:{t.label[:8]}" for t in e.tokens[:n]]
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        ax.set_xlabel("key (what a token offers)", fontsize=8)
        ax.set_ylabel("query (what a token looks for)", fontsize=8)
        ax.set_title(f"layer {e.layer}, head {e.head}: every token's attention (rows sum to 1)", fontsize=9)

    step = f", training step {e.step}" if e.step is not None else ""
    fig.suptitle(
        f"potion explain: {e.prompt[:60]!r}{step} — attention weights are not by themselves an explanation", fontsize=9
    )
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
