"""The training entry point: ``deepspeed launch/train.py --config FILE [--set dotted.key=value ...]``.

Thin on purpose: parse the arguments, validate the run config before any heavy work, and hand it to
``ds_scalora.train.loop.run``. Problems with the input end the run with one paragraph and a non-zero
exit status; only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_scalora.train.config import ConfigError, load_config  # noqa: E402
from ds_scalora.train.data import DataError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config (YAML or JSON)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set train.max_steps=100 method.name=lora")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        from ds_scalora.train.checkpoints import CheckpointError
        from ds_scalora.train.loop import run
        from ds_scalora.zero import UnsupportedConfig

        try:
            run(cfg)
        except (DataError, UnsupportedConfig, CheckpointError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
        finally:
            _tear_down_process_group()
    except ConfigError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {e}\n(config: {args.config}; see README.md, 'Run configs')", file=sys.stderr)
        return 2
    return 0


def _tear_down_process_group() -> None:
    """Destroy the process group before interpreter exit, so that gloo's threads stop in order (left to
    exit, they once aborted a finished run with "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
