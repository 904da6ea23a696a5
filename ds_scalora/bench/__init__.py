"""Layer 4: the benchmarks behind ``tools/benchmark.py`` (one command line, one subcommand per module here).

* ``suite``: every method side by side on the preset tasks (quality, cost, ZeRO scaling report) -> docs/benchmarks.md;
* ``power``: the powered ScaLoRA benchmark (paired seeds, tuned grids, statistics) -> docs/benchmarks_power.md;
* ``refresh_cost``: one refresh against a LoRA step, SmolLM2-135M shape; ``profile_refresh``: cProfile of it;
* ``elalora_cost``: ElaLoRA's step time against LoRA's at its buffer rank, side by side;
* ``zero_scaling``: a refresh's communication and time at 1, 2, 4 DeepSpeed ranks;
* ``convert_memory``: the peak memory of converting a checkpoint.
"""

import os

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository root (docs/, ds_configs/)
