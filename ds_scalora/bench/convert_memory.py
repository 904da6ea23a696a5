"""Memory of ``convert.py merged`` against the model's size, on a synthetic many-layer checkpoint.

Writes a ZeRO-2 checkpoint in DeepSpeed 0.19.8's file layout (a random Llama with LoRA on q_proj and
v_proj, fp32, N data-parallel ranks) without training, exports it, and samples the process's anonymous
resident memory (``RssAnon``: memory-mapped checkpoint pages are file-backed and are not counted,
they can be dropped at any time) every millisecond. Prints the peak increase, the model's size, the
largest module, and their ratios.

    python tools/benchmark.py convert-memory --layers 48 --hidden 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import OrderedDict

import torch



def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The highest ``RssAnon`` seen by a background thread while the block runs."""

    def __init__(self, every: float = 0.001):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        self.base = rss_anon()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())

    @property
    def increase(self) -> int:
        return self.peak - self.base


def make_synthetic_checkpoint(run_dir: str, layers: int, hidden: int, world: int = 2, r: int = 4) -> dict:
    """A complete ZeRO-2 checkpoint of a random-init Llama + LoRA; returns its sizes in bytes (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..checkpoint.deepspeed_files import TESTED_DEEPSPEED
    from ..checkpoint.layout import mark_complete

    fields = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64}  # fmt: skip
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(LlamaConfig(vocab_size=262, **fields)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    module, frozen, trainable = OrderedDict(), OrderedDict(), OrderedDict()
    for name, shape in shapes.items():
        adapted = name.endswith(("q_proj.weight", "v_proj.weight"))
        ck = "base_model.model." + (name.replace(".weight", ".base_layer.weight") if adapted else name)
        module[ck] = torch.randn(shape, generator=g) * 0.02
        frozen[ck] = shape
        if adapted:
            stem = ck.removesuffix(".base_layer.weight")
            trainable[stem + ".lora_A.default.weight"] = torch.randn(r, shape[1], generator=g) * 0.01
            trainable[stem + ".lora_B.default.weight"] = torch.randn(shape[0], r, generator=g) * 0.01
    module.update(trainable)
    tag = os.path.join(run_dir, "checkpoints", "step00000001")
    os.makedirs(tag)
    torch.save({"module": module, "buffer_names": [], "param_shapes": [OrderedDict((k, v.shape) for k, v in trainable.items())],
                "frozen_param_shapes": frozen, "shared_params": {}, "ds_version": TESTED_DEEPSPEED, "global_steps": 1,
                "step": 1}, os.path.join(tag, "mp_rank_00_model_states.pt"))  # fmt: skip
    flat = torch.cat([t.reshape(-1) for t in trainable.values()])
    chunk = -(-flat.numel() // (2 * world)) * 2
    flat = torch.cat([flat, flat.new_zeros(chunk * world - flat.numel())])
    for rank in range(world):
        part = flat[rank * chunk : (rank + 1) * chunk].clone()
        osd = {"zero_stage": 2, "partition_count": world, "single_partition_of_fp32_groups": [part],
               "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros_like(part),
                                                      "exp_avg_sq": torch.zeros_like(part)}}}}  # fmt: skip
        torch.save({"optimizer_state_dict": osd}, os.path.join(tag, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    mark_complete(tag, 1)
    config = {"model": {"model_name_or_path": None, "random_init": fields, "dtype": "fp32"},
              "method": {"name": "lora", "r": r, "lora_alpha": 2.0 * r, "use_rslora": False}, "train": {"seed": 0}}  # fmt: skip
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"config": config}, f)
    sizes = [t.numel() * 4 for t in module.values()]
    return {"total_bytes": sum(sizes), "largest_module_bytes": max(sizes), "tensors": len(sizes)}


def export_and_sample(run: str, out: str, max_shard_size: str, dtype: str | None = None) -> int:
    """In this (fresh) process: export ``run`` and return the peak anonymous-memory increase."""
    from ..export import RunSource
    from ..export.merged import export_merged

    source = RunSource(run)
    source.hf_config(), source.tokenizer()  # imports and the tokenizer build are fixed costs, not the model's
    with PeakSampler() as sampler:
        export_merged(source, out, dtype=dtype, max_shard_size=max_shard_size, progress=False)
    return sampler.increase


def measure(layers: int, hidden: int, workdir: str, max_shard_size: str | None = None, dtype: str = "fp32") -> dict:
    """Write a synthetic checkpoint, export it in a fresh process (so that no memory freed by the
    writing is reused), and return the peak anonymous-memory increase against the model's sizes."""
    import subprocess

    run = os.path.join(workdir, "run")
    sizes = make_synthetic_checkpoint(run, layers, hidden)
    shard = max_shard_size or str(sizes["largest_module_bytes"])
    proc = subprocess.run([sys.executable, "-m", "ds_scalora.bench.convert_memory", "--export", run, os.path.join(workdir, "merged"),
                           "--max-shard-size", shard, "--dtype", dtype], capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"export failed:\n{proc.stderr[-3000:]}")
    increase = int(proc.stdout.strip().splitlines()[-1])
    return {**sizes, "peak_increase_bytes": increase, "peak_over_total": increase / sizes["total_bytes"],
            "peak_over_largest_module": increase / sizes["largest_module_bytes"]}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--max-shard-size", default=None, help="default: the largest module's size")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="exported dtype (default fp32)")
    p.add_argument("--export", nargs=2, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.export:
        print(export_and_sample(*a.export, a.max_shard_size, a.dtype))
        return
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(a.layers, a.hidden, tmp, a.max_shard_size, a.dtype)
    mib = 1 << 20
    print(f"model {r['total_bytes'] / mib:.1f} MiB in {r['tensors']} tensors, largest module "
          f"{r['largest_module_bytes'] / mib:.2f} MiB; peak extra anonymous memory {r['peak_increase_bytes'] / mib:.1f} MiB "
          f"= {r['peak_over_total']:.3f} x the model = {r['peak_over_largest_module']:.1f} x the largest module")


if __name__ == "__main__":
    main()
