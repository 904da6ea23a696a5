"""DeepSpeed's package, imported without the mlflow that its autotuner imports when it is installed.

``deepspeed.autotuning.autotuner`` runs ``try: import mlflow`` when the package is imported (through
``deepspeed.runtime.config``), so with mlflow-skinny installed (the ``report`` extra, for
``train.report_to: mlflow``) every process that imports DeepSpeed spent about 2.3 s of its ~3-6 s there
(``python -X importtime``, 2026-12-03), for an autotuner ds-scalora never runs: every rank of every
launch and every ``tools/convert.py``. So the first import goes through :func:`import_deepspeed`, which
blocks the name ``mlflow`` (a ``None`` entry in ``sys.modules``, which ``import`` reads as not installed)
only while DeepSpeed's package is imported, and releases it at once: ``import mlflow``,
transformers' and accelerate's checks for it and ``train.report_to: mlflow`` work as before
(``tests/test_deepspeed_import.py``). Where mlflow or DeepSpeed is already imported, nothing is blocked.
"""

from __future__ import annotations

import sys


def import_deepspeed():
    """The ``deepspeed`` module; the first call in a process imports it with mlflow blocked (see above).
    Every place in ds_scalora that imports DeepSpeed calls this first."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None
        try:
            import deepspeed  # noqa: F401
        finally:
            if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
                del sys.modules["mlflow"]
    import deepspeed

    return deepspeed
