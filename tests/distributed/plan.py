"""``--plan FILE``: several runs of a worker script in one launch (``launch.run_deepspeed_plan``).

A 2-rank launch costs ~29 s on 2 cores, ~20 s of it process start-up and imports; a further run in the
same ranks costs what its own work costs (measured 2026-12-03: eleven equivalence runs in 46 s). FILE is a
JSON list of argument lists, each with its own ``--out``; the worker's ``main(argv)`` runs once per list,
in order, every rank the same. Each run must leave nothing behind that the next one would see (a worker
destroys its DeepSpeed engine at the end of ``main``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main_or_plan(main) -> None:
    """``main()`` on the command line's arguments, or once per argument list of ``--plan FILE``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--plan")
    known, _ = p.parse_known_args()  # the launcher adds --local_rank=N
    if not known.plan:
        main()
        return
    for argv in json.loads(Path(known.plan).read_text()):
        main(argv)
