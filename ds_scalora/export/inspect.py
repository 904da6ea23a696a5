"""A look inside a run: per adapted module, the spectrum and numerical rank of the accumulated update.

The update is effective weight minus base weight (merges plus current factors). Written: ``inspect.json``
(singular values and ranks per module), ``rank_vs_depth.png`` (numerical rank against layer index, one
line per projection type) and ``summary.txt`` (the one-screen text that is also printed).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from tqdm import tqdm

from ..spectrum import energy_outside_top, numerical_rank, singular_values
from .output import atomic_dir
from .peft_export import choose_rank
from .source import ExportError, RunSource
from .weights import EffectiveWeights

_DEPTH = re.compile(r"\.(\d+)\.")


def depth_and_kind(module: str) -> tuple[int, str]:
    """(layer index, projection name) of ``model.layers.7.self_attn.q_proj``."""
    m = _DEPTH.search(module)
    return (int(m.group(1)) if m else -1), module.rsplit(".", 1)[-1]


def inspect_updates(source: RunSource, rtol: float = 1e-3, energy: float = 0.99, progress: bool = True) -> dict:
    if source.method["name"] == "full":
        raise ExportError("inspect looks at adapted modules; a full fine-tuning run has none")
    weights = EffectiveWeights(source)
    modules = {}
    for name in tqdm(weights.adapted(), desc="spectra", unit="module", disable=not progress):
        update = weights.update_out_in(name)
        s = singular_values(update)
        depth, kind = depth_and_kind(name.removesuffix(".weight"))
        modules[name.removesuffix(".weight")] = {
            "depth": depth, "kind": kind, "shape": list(update.shape), "norm": float(s.norm()),
            "numerical_rank": numerical_rank(update, rtol=rtol), "energy_rank": choose_rank(s, None, energy),
            "energy_outside_top_r": energy_outside_top(update, source.method.get("r") or 0),
            "singular_values": [float(x) for x in s],
        }  # fmt: skip
    return {"checkpoint": source.tag_dir, "step": source.step, "method": source.method["name"],
            "lora_rank": source.method.get("r"), "rtol": rtol, "energy": energy, "modules": modules}  # fmt: skip


def summary_text(result: dict) -> str:
    mods = result["modules"]
    by_kind = defaultdict(list)
    for m in mods.values():
        by_kind[m["kind"]].append(m)
    lines = [f"{result['checkpoint']} (step {result['step']}, method {result['method']}, LoRA r={result['lora_rank']})",
             f"numerical rank of the accumulated update (singular values > {result['rtol']:g} x largest); "
             f"energy rank keeps {result['energy']:.0%} of the squared norm",
             f"{'projection':<12} {'modules':>7} {'rank min':>8} {'mean':>7} {'max':>5} {'energy rank':>11} {'|update| mean':>13}"]  # fmt: skip
    for kind, ms in sorted(by_kind.items()):
        ranks = [m["numerical_rank"] for m in ms]
        lines.append(f"{kind:<12} {len(ms):>7} {min(ranks):>8} {sum(ranks) / len(ranks):>7.1f} {max(ranks):>5} "
                     f"{sum(m['energy_rank'] for m in ms) / len(ms):>11.1f} {sum(m['norm'] for m in ms) / len(ms):>13.3e}")
    ranks = [m["numerical_rank"] for m in mods.values()]
    if ranks:
        above = sum(r > (result["lora_rank"] or 0) for r in ranks)
        lines.append(f"all {len(ranks)} modules: mean rank {sum(ranks) / len(ranks):.1f}, max {max(ranks)}; "
                     f"{above} above the LoRA rank")
        shares = [m["energy_outside_top_r"] for m in mods.values() if m.get("energy_outside_top_r") == m.get("energy_outside_top_r")]
        if shares and result["lora_rank"]:
            lines.append(f"share of the update's energy outside its top {result['lora_rank']} directions (what a rank-"
                         f"{result['lora_rank']} adapter cannot hold): mean {sum(shares) / len(shares):.3f}, "
                         f"max {max(shares):.3f}")
    return "\n".join(lines)


def plot_rank_vs_depth(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind = defaultdict(list)
    for m in result["modules"].values():
        by_kind[m["kind"]].append((m["depth"], m["numerical_rank"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, pts in sorted(by_kind.items()):
        pts.sort()
        ax.plot([d for d, _ in pts], [r for _, r in pts], marker="o", label=kind)
    if result["lora_rank"]:
        ax.axhline(result["lora_rank"], color="grey", linestyle="--", label=f"LoRA r={result['lora_rank']}")
    ax.set_xlabel("layer index")
    ax.set_ylabel("numerical rank of the update")
    ax.set_title(f"accumulated update, step {result['step']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_inspection(result: dict, out: str, overwrite: bool = False) -> str:
    with atomic_dir(out, overwrite) as tmp:
        with open(os.path.join(tmp, "inspect.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot_rank_vs_depth(result, os.path.join(tmp, "rank_vs_depth.png"))
        text = summary_text(result)
        with open(os.path.join(tmp, "summary.txt"), "w") as f:
            f.write(text + "\n")
    return text
