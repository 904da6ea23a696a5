"""``ds_scalora.deepspeed_import``: DeepSpeed comes in without the mlflow its autotuner would import, and
mlflow is left fully usable afterwards. Each case runs in a fresh interpreter (the first import is the one
that matters)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("mlflow")
REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_package_imports_deepspeed_without_mlflow_and_mlflow_still_works():
    """Importing the ZeRO layer (its checkpoint reader imports DeepSpeed at import time) leaves mlflow
    unimported and DeepSpeed's autotuner without it; afterwards mlflow imports, and transformers'
    and accelerate's availability checks (what HF Trainer's report_to consults) still see it."""
    got = _run(
        "import sys, json\n"
        "import ds_scalora.zero\n"
        "seen = {'deepspeed': 'deepspeed' in sys.modules, 'mlflow_after_deepspeed': 'mlflow' in sys.modules}\n"
        "import deepspeed.autotuning.autotuner as a\n"
        "seen['autotuner_mlflow'] = a.has_mlflow\n"
        "from transformers.integrations.integration_utils import is_mlflow_available as t\n"
        "from accelerate.utils.imports import is_mlflow_available as acc\n"
        "seen['transformers_sees_mlflow'], seen['accelerate_sees_mlflow'] = t(), acc()\n"
        "import mlflow\n"
        "seen['mlflow_imports'] = hasattr(mlflow, 'MlflowClient')\n"
        "print(json.dumps(seen))"
    )
    assert got == {"deepspeed": True, "mlflow_after_deepspeed": False, "autotuner_mlflow": False,
                   "transformers_sees_mlflow": True, "accelerate_sees_mlflow": True, "mlflow_imports": True}


def test_nothing_is_blocked_where_mlflow_or_deepspeed_came_first():
    """A process that imported mlflow itself keeps it everywhere, DeepSpeed's autotuner included; a
    second call after DeepSpeed is in returns the same module and blocks nothing."""
    got = _run(
        "import sys, json\n"
        "import mlflow\n"
        "from ds_scalora.deepspeed_import import import_deepspeed\n"
        "ds = import_deepspeed()\n"
        "import deepspeed.autotuning.autotuner as a\n"
        "print(json.dumps({'autotuner_mlflow': a.has_mlflow, 'same': import_deepspeed() is ds,"
        " 'mlflow_kept': sys.modules['mlflow'] is mlflow}))"
    )
    assert got == {"autotuner_mlflow": True, "same": True, "mlflow_kept": True}
