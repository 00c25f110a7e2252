"""Plots: attention heat-maps."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def plot_attention(weights: Sequence[torch.Tensor], src_tokens: Sequence[str], tgt_tokens: Sequence[str],
                   out: str | Path, title: str = "") -> Path:
    """One heat-map per layer of (T_tgt, T_src) attention weights (rows: target, columns: source)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(weights)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.2), squeeze=False)
    for i, (ax, w) in enumerate(zip(axes[0], weights)):
        ax.imshow(w.detach().float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(src_tokens)), list(src_tokens), fontsize=8)
        ax.set_yticks(range(len(tgt_tokens)), list(tgt_tokens), fontsize=8)
        ax.set_title(f"decoder layer {i + 1}", fontsize=9)
        ax.set_xlabel("source")
    axes[0][0].set_ylabel("target")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
