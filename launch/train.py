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


PEER_LOST = 5  # exit statuses: 2 bad input, 3 diverged, 4 final model not written, 5 another rank failed


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
        from ds_scalora.train.loop import Diverged, FinalModelError, run
        from ds_scalora.zero import UnsupportedConfig, end_distributed, peer_lost

        try:
            run(cfg)
        except (DataError, UnsupportedConfig, CheckpointError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
        except RuntimeError as e:  # a collective left waiting for a rank that failed (and said why) or was killed
            if not peer_lost(e):
                raise
            rank = os.environ.get("RANK", "0")
            print(f"[rank {rank}] stopped: another rank ended while this one waited for it in a collective; that "
                  f"rank's own error, if it had one, is above ({str(e).splitlines()[0][-120:]})", file=sys.stderr, flush=True)
            return PEER_LOST
        except Diverged as e:  # every rank sees the same global loss and norm: all stop here together
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {e}", file=sys.stderr, flush=True)
            end_distributed()
            return 3
        except FinalModelError as e:  # rank 0 only; the others wait for it in end_distributed
            print(f"error: {e}", file=sys.stderr, flush=True)
            end_distributed()
            return 4
        # only after a run that finished: after a failure the barrier would wait for ranks that never come
        end_distributed()
    except ConfigError as e:
        # every rank says it: the launcher kills the others as soon as one rank exits, so a message left to
        # rank 0 alone can be lost (it was, 1 run in 20), and an error only one rank met is that rank's to tell
        rank = os.environ.get("RANK", "0")
        who = "" if rank == "0" else f"[rank {rank}] "
        print(f"{who}error: {e}\n{who}(config: {args.config}; see README.md, 'Run configs')", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    status = main()
    if "ds_scalora.zero" in sys.modules:  # a run began: end it as a gloo run must (ds_scalora/zero/teardown.py)
        from ds_scalora.zero import exit_process

        exit_process(status)
    sys.exit(status)
