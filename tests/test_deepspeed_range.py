"""The oldest supported DeepSpeed passes the ZeRO tests too, not only the pinned newest one (issue 18).

The rest of the suite runs with the installed DeepSpeed (``TESTED_DEEPSPEED``, the newest of the range).
This test installs ``OLDEST_DEEPSPEED`` beside it, once per machine, into
``$DS_SCALORA_CACHE/deepspeed-<version>`` (``pip install --target --no-deps --no-build-isolation``: the
installed torch builds it, no op is compiled; about 40 s), and runs, in a subprocess with that directory
first on ``PYTHONPATH``: ``tests/test_zero_single_rank.py`` (ZeRO-0 to 3 on one rank against the
single-process reference, ReLoRA, bf16, non-finite gradients, refusals) and the 2-rank equivalence tests
that share one launch (``launch.SharedLaunch``): ScaLoRA at ZeRO-0 to 3, its Adam-aware solver and bf16,
ElaLoRA at ZeRO-0/2/3, LoRA at ZeRO-3 and bf16 ZeRO-2, eleven runs for the cost of one launch. The whole
equivalence suite (16 tests) passed with 0.19.6 by hand on 2026-12-01 (870 s); that is too long for CI to
repeat.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_scalora.checkpoint.deepspeed_files import OLDEST_DEEPSPEED, TESTED_DEEPSPEED
from ds_scalora.train.packaged_models import cache_dir

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[1]
SCALORA = "tests/distributed/test_zero_scalora_equivalence.py::"
SELECTION = ["tests/test_zero_single_rank.py",
             f"{SCALORA}test_scalora_matches_single_process_2_ranks", f"{SCALORA}test_scalora_bf16_zero3",
             f"{SCALORA}test_adam_aware_solver_zero3_matches_single_process",
             "tests/distributed/test_zero_elalora_equivalence.py",
             "tests/distributed/test_zero_lora_equivalence.py::test_plain_lora_matches_single_process"]  # fmt: skip


def _oldest_deepspeed() -> Path:
    target = Path(cache_dir()) / f"deepspeed-{OLDEST_DEEPSPEED}"
    if not (target / "deepspeed" / "__init__.py").is_file():
        tmp = target.with_name(target.name + ".partial")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(tmp), f"deepspeed=={OLDEST_DEEPSPEED}"], check=True, timeout=900)  # fmt: skip
        os.replace(tmp, target)
    return target


def test_the_oldest_supported_deepspeed_passes_the_zero_tests():
    assert OLDEST_DEEPSPEED != TESTED_DEEPSPEED
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_oldest_deepspeed()), str(REPO)]), "DS_ACCELERATOR": "cpu"}
    env.pop("DS_SCALORA_ALLOW_UNTESTED_DEEPSPEED", None)  # in range: no override needed
    version = subprocess.run([sys.executable, "-c", "import deepspeed; print(deepspeed.__version__)"], env=env,
                             capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert version.stdout.strip().splitlines()[-1] == OLDEST_DEEPSPEED, version.stdout + version.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SELECTION], env=env,
                          capture_output=True, text=True, timeout=1200, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
