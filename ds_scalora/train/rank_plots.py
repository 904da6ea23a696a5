"""The rank heatmap of an ElaLoRA run: which adapted matrix held how many ranks after every round."""

from __future__ import annotations


def short_name(layer_name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj`` -> ``3.self_attn.q_proj``."""
    return layer_name.split("layers.", 1)[-1] if "layers." in layer_name else layer_name.removeprefix("base_model.model.")


def depth_key(layer_name: str):
    """Natural order: block 2 before block 10 (names sort as strings otherwise)."""
    return [int(part) if part.isdigit() else part for part in layer_name.split(".")]


def write_rank_heatmap(rounds: list[dict], layer_names: list[str], path: str, max_rank: int) -> None:
    """PNG: one row per adapted matrix (in depth order), one column per round (after its moves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = sorted(range(len(layer_names)), key=lambda i: depth_key(layer_names[i]))
    layer_names = [layer_names[i] for i in order]
    ranks = np.array([r["ranks"] for r in rounds], dtype=float).T[order]  # layers (by depth) x rounds
    steps = [r["step"] for r in rounds]
    height = min(20.0, max(3.0, 0.07 * len(layer_names) + 1.5))
    fig, ax = plt.subplots(figsize=(min(16.0, 6 + 0.25 * len(steps)), height))
    image = ax.imshow(ranks, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=max_rank)
    ax.set_xlabel("after the round at optimizer step")
    ticks = list(range(0, len(steps), max(1, len(steps) // 12)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    every = max(1, len(layer_names) // 40)
    ax.set_yticks(range(0, len(layer_names), every), [short_name(n) for n in layer_names][::every], fontsize=6)
    ax.set_title(f"ElaLoRA: active rank per adapted matrix\n(budget {int(ranks[:, 0].sum())}, buffers of {max_rank})",
                 fontsize=10)
    fig.colorbar(image, ax=ax, label="active rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
