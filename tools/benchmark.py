"""Every benchmark of the project, one command line over ``ds_scalora/bench/`` (no logic here).

    python tools/benchmark.py quality --preset quick     # all methods side by side -> docs/benchmarks.md (suite)
    python tools/benchmark.py cost --preset cpu          # per-method step time and memory (suite --cost-only)
    python tools/benchmark.py scaling --preset cpu       # the ZeRO scaling report (suite --scaling-only)
    python tools/benchmark.py power                      # the powered ScaLoRA benchmark -> docs/benchmarks_power.md
    python tools/benchmark.py refresh                    # one refresh against a LoRA step, SmolLM2-135M shape
    python tools/benchmark.py elalora                    # ElaLoRA's step time against LoRA at its buffer rank
    python tools/benchmark.py profile-refresh            # cProfile of the refresh inside the training entry point
    python tools/benchmark.py zero --quick               # a refresh's communication at 1, 2, 4 DeepSpeed ranks
    python tools/benchmark.py convert-memory             # peak memory of tools/convert.py merged

``python tools/benchmark.py SUBCOMMAND --help`` lists a subcommand's options; without a subcommand the
options go to ``quality`` (the form used before 2026-12-01).
"""

from __future__ import annotations

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# subcommand -> (module under ds_scalora.bench, arguments put in front of the user's)
COMMANDS = {
    "quality": ("suite", []),
    "cost": ("suite", ["--cost-only"]),
    "scaling": ("suite", ["--scaling-only"]),
    "power": ("power", []),
    "refresh": ("refresh_cost", []),
    "elalora": ("elalora_cost", []),
    "profile-refresh": ("profile_refresh", []),
    "zero": ("zero_scaling", []),
    "convert-memory": ("convert_memory", []),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "quality"
    if command not in COMMANDS:
        sys.exit(f"tools/benchmark.py: unknown subcommand {command!r}; one of: {', '.join(COMMANDS)}")
    module, front = COMMANDS[command]
    importlib.import_module(f"ds_scalora.bench.{module}").main(front + argv)


if __name__ == "__main__":
    main()
