"""The gloo exit abort of ds_scalora/zero/teardown.py, reproduced (not part of the suite: it is a
frequency, so it takes many launches; run it by hand when touching the teardown).

    python tests/distributed/gloo_exit_repro.py --runs 20 --load 2

launches 2 gloo ranks that all_reduce 2000 temporaries on a group the program keeps a reference to
(as DeepSpeed does) and then end in one of three ways: ``plain`` (fall off the end), ``end``
(``end_distributed``: barrier + destroy) or ``exit`` (``end_distributed`` + ``exit_process``). It prints
how many launches aborted for each; ``--load N`` runs N busy loops meanwhile (the abort needs a worker
thread descheduled at the wrong moment).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def rank_main(mode: str) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist

    from ds_scalora.zero.teardown import end_distributed, exit_process

    dist.init_process_group("gloo")
    kept = dist.new_group([0, 1])
    for i in range(2000):
        dist.all_reduce(torch.full((64,), float(i)), group=kept)
    if mode in ("end", "exit"):
        end_distributed()
    if mode == "exit":
        exit_process(0)


def launch_pair(mode: str) -> bool:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (1, 0):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-mode", mode], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    return all(rc == 0 for rc, _ in results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--load", type=int, default=2, help="busy loops to run meanwhile")
    p.add_argument("--modes", nargs="+", default=["plain", "end", "exit"], choices=["plain", "end", "exit"])
    p.add_argument("--rank-mode", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank_mode:
        rank_main(a.rank_mode)
        return
    # busy loops that end with this process, however it ends (a killed driver must not leave them spinning)
    spin = f"import os\nwhile os.getppid() == {os.getpid()}: pass"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(a.load)]
    try:
        for mode in a.modes:
            aborted = sum(not launch_pair(mode) for _ in range(a.runs))
            print(f"{mode}: {aborted}/{a.runs} launches aborted", flush=True)
    finally:
        for b in busy:
            b.kill()


if __name__ == "__main__":
    main()
