"""Convert a ds_scalora / DeepSpeed checkpoint: a merged HF model, a PEFT adapter, a look inside.

    python tools/convert.py merged  RUN_OR_CHECKPOINT [OUT] [--dtype bf16|fp32|fp16] [--max-shard-size 2GB]
    python tools/convert.py adapter RUN_OR_CHECKPOINT [OUT]   (the exact PEFT adapter of a LoRA, rsLoRA or ElaLoRA run)
    python tools/convert.py peft    RUN_OR_CHECKPOINT [OUT] [--rank R | --energy 0.99]
    python tools/convert.py inspect RUN_OR_CHECKPOINT [OUT] [--rtol 1e-3]
    python tools/convert.py reshard RUN_OR_CHECKPOINT [OUT] --world M   (ZeRO-1/2/3; resume with train.resume_from_checkpoint=OUT)

CHECKPOINT_DIR is a run's output dir, its checkpoints/ dir, one step tag, or a DeepSpeed dir with a
'latest' file; the newest complete tag is used. OUT defaults to <run>/exports/<command>-stepNNNNNNNN.
The logic lives in ds_scalora.export; this file is only the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_scalora.export import ExportError, RunSource  # noqa: E402
from ds_scalora.checkpoint.deepspeed_files import CheckpointFileError  # noqa: E402


def default_out(source: RunSource, command: str, world: int | None = None) -> str:
    tag = source.tag_dir
    run = source.run_dir
    if command == "reshard":  # a run-like tree, so that train.output_dir=<...>/world{M} resumes it with 'auto'
        return os.path.join(run, "exports", f"world{world}", "checkpoints", os.path.basename(tag))
    return os.path.join(run, "exports", f"{command}-{os.path.basename(tag)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)

    def common(name, help_text):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("checkpoint", help="run output dir, its checkpoints/ dir, a step tag, or a DeepSpeed dir")
        s.add_argument("out", nargs="?", default=None, help="output directory (default: <run>/exports/<command>-<tag>)")
        s.add_argument("--config", default=None, help="the run's config file, if the checkpoint does not say")
        s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        return s

    m = common("merged", "a Hugging Face model with the adapter and every merge folded in")
    m.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None, help="default: the run's model.dtype")
    m.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    common("adapter", "the run's own adapter as a stock PEFT adapter, exactly (LoRA, rsLoRA, ElaLoRA)")
    e = common("peft", "a PEFT LoRA adapter from a truncated SVD of the total update")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, default=None, help="keep this rank in every module")
    g.add_argument("--energy", type=float, default=0.99, help="keep this fraction of each update's squared norm (default 0.99)")
    e.add_argument("--adapter-dtype", choices=["bf16", "fp32", "fp16"], default="fp32")
    i = common("inspect", "spectrum and numerical rank of the accumulated update, per module")
    i.add_argument("--rtol", type=float, default=1e-3, help="rank counts singular values above rtol x the largest")
    i.add_argument("--energy", type=float, default=0.99)
    r = common("reshard", "the checkpoint rewritten for another data-parallel world size (ZeRO-1/2/3, ScaLoRA and ElaLoRA state included)")
    r.add_argument("--world", type=int, required=True, help="number of data-parallel ranks to resume at")
    return p


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes some libraries put in their messages


def _missing_ancestor(path: str) -> str | None:
    """The outermost directory of ``path`` that does not exist yet (what this run would create)."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path):
        top, path = path, os.path.dirname(path)
    return top


def _remove_empty(path: str | None, top: str | None) -> None:
    """Remove the directories a failed export created and left empty, from ``path`` up to ``top``."""
    if path is None or top is None:
        return
    path = os.path.abspath(path)
    while path.startswith(top):
        if os.path.isdir(path):
            if os.listdir(path):
                break
            os.rmdir(path)
        elif os.path.exists(path):
            break
        if path == top:
            break
        path = os.path.dirname(path)


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    out = top = None
    try:
        source = RunSource(a.checkpoint, a.config)
        out = a.out or default_out(source, a.command, getattr(a, "world", None))
        top = _missing_ancestor(out)
        progress = not a.quiet
        if a.command == "merged":
            from ds_scalora.export.merged import export_merged

            info = export_merged(source, out, a.dtype, a.max_shard_size, a.overwrite, progress)
            print(json.dumps(info, indent=1))
        elif a.command == "adapter":
            from ds_scalora.export.adapter_export import export_adapter

            print(json.dumps(export_adapter(source, out, a.overwrite, progress), indent=1))
        elif a.command == "peft":
            from ds_scalora.export.peft_export import REPORT, export_peft, format_report

            report = export_peft(source, out, a.rank, a.energy, a.adapter_dtype, a.overwrite, progress)
            print(format_report(report))
            print(f"report: {os.path.join(out, REPORT)}")
        elif a.command == "reshard":
            from ds_scalora.export.reshard import reshard

            print(json.dumps(reshard(source, out, a.world, a.overwrite), indent=1))
        else:
            from ds_scalora.export.inspect import inspect_updates, write_inspection

            text = write_inspection(inspect_updates(source, a.rtol, a.energy, progress), out, a.overwrite)
            print(text)
        print(f"written: {os.path.abspath(out)}")
        return 0
    except (ExportError, CheckpointFileError) as e:
        _remove_empty(out, top)
        print(f"error: {ANSI.sub('', str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
