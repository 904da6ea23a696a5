"""Where a run's metrics go besides ``summary.json``: ``train.report_to`` names any of TensorBoard, Weights & Biases
and MLflow, and one object with the TensorBoard writer's three calls (``add_scalar``, ``add_histogram``, ``close``)
fans out to all of them, so the loop and the methods log once and never ask where to.

* tensorboard: ``<output_dir>/tensorboard``.
* wandb: offline unless ``WANDB_MODE`` says otherwise, so nothing leaves the machine during training; the run lands
  in ``<output_dir>/wandb/offline-run-*`` and ``wandb sync <that dir>`` uploads it later. ``WANDB_PROJECT`` names the
  project (default "ds-scalora").
* mlflow: ``MLFLOW_TRACKING_URI`` if set, else a file store in ``<output_dir>/mlruns`` (no server or database
  needed; MLflow 3.x wants ``MLFLOW_ALLOW_FILE_STORE=true`` for it, set here unless already set, and
  ``mlflow migrate-filestore`` moves it into a database later). ``MLFLOW_EXPERIMENT_NAME`` names the experiment
  (default "ds-scalora"). It goes through an ``MlflowClient``, never the fluent API, so no active run outlives
  ``close()`` in a process that trains many runs.

The packages are imported only for the integrations named, and ``missing_packages`` checks for them without
importing, so a config can be rejected before anything heavy loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports REPORTERS and missing_packages: no torch for that
    import torch

REPORTERS = ("tensorboard", "wandb", "mlflow", "none")
# integration -> (module it imports, pip requirement that provides it)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
             "mlflow": ("mlflow", "mlflow-skinny")}  # fmt: skip


def missing_packages(names) -> list[str]:
    """The pip requirement of every named integration whose package is not installed (found without importing it)."""
    return [_PACKAGES[n][1] for n in names if n in _PACKAGES and not _installed(_PACKAGES[n][0])]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a __spec__: it is importable
        return True


class Reporters:
    """The TensorBoard writer's interface over every integration in ``train.report_to``."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def add_scalar(self, tag: str, value, step: int) -> None:
        for sink in self.sinks:
            sink.add_scalar(tag, value, step)

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        for sink in self.sinks:
            sink.add_histogram(tag, values, step)

    def close(self) -> None:
        """Close every integration, even after one fails (the first failure is raised at the end)."""
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - the others must still close
                errors.append(e)
        if errors:
            raise errors[0]


def open_reporters(names: list[str], output_dir: str, run_config: dict) -> Reporters | None:
    """Open the named integrations (``train.report_to`` as a list); None for none."""
    names = [n for n in names if n != "none"]
    if not names:
        return None
    unknown = [n for n in names if n not in _OPEN]
    if unknown:
        raise ValueError(f"train.report_to: {unknown} not supported; use any of {', '.join(REPORTERS)}")
    missing = missing_packages(names)
    if missing:
        raise ImportError(f"train.report_to {names} needs {', '.join(missing)}, which is not installed: "
                          f"pip install {' '.join(missing)} (or drop it from train.report_to)")
    opened = []
    try:
        for name in names:
            opened.append(_OPEN[name](output_dir, run_config))
    except BaseException:
        with contextlib.suppress(Exception):  # a wandb run already started must not linger; the first error stands
            Reporters(opened).close()
        raise
    return Reporters(opened)


def _tensorboard(output_dir: str, run_config: dict):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(output_dir, "tensorboard"))


def _run_name(output_dir: str) -> str:
    return os.path.basename(os.path.abspath(output_dir))


class _WandB:
    def __init__(self, output_dir: str, run_config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=output_dir,
                              project=os.environ.get("WANDB_PROJECT", "ds-scalora"), name=_run_name(output_dir),
                              config=run_config)  # fmt: skip

    def add_scalar(self, tag, value, step):
        self.run.log({tag: float(value)}, step=int(step))

    def add_histogram(self, tag, values, step):
        self.run.log({tag: self.wandb.Histogram(values.detach().float().cpu().numpy())}, step=int(step))

    def close(self):
        self.run.finish()
        # finish() leaves wandb's service process (wandb-core) running until this process exits
        self.wandb.teardown()


class _MLflow:
    def __init__(self, output_dir: str, run_config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = "file:" + os.path.join(os.path.abspath(output_dir), "mlruns")
            # MLflow 3.x refuses its file store unless opted in ("maintenance mode"); it needs no server or database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = _experiment_id(self.client, os.environ.get("MLFLOW_EXPERIMENT_NAME", "ds-scalora"))
        self.run_id = self.client.create_run(experiment, run_name=_run_name(output_dir)).info.run_id
        params = [Param(_key(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in _flatten(run_config).items()]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def add_scalar(self, tag, value, step):
        self.client.log_metric(self.run_id, _key(tag), float(value), step=int(step))

    def add_histogram(self, tag, values, step):
        """MLflow has no histogram: its min, mean and max as three metrics."""
        v = values.detach().float()
        for stat, x in (("min", v.min()), ("mean", v.mean()), ("max", v.max())):
            self.add_scalar(f"{tag}/{stat}", float(x), step)

    def close(self):
        self.client.set_terminated(self.run_id)


def _experiment_id(client, name: str) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created meanwhile by another run on the same tracking server
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def _key(name: str) -> str:
    """A metric or param name MLflow accepts: alphanumerics, ``_ - . /`` and spaces, no empty path parts."""
    name = re.sub(r"[^\w./\- ]", "_", name)
    return "/".join(part for part in name.split("/") if part not in ("", ".", "..")) or "_"


def _flatten(config: dict, prefix: str = "") -> dict:
    """A nested run config as {"train.learning_rate": ...}: MLflow params are flat."""
    flat = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


_OPEN = {"tensorboard": _tensorboard, "wandb": _WandB, "mlflow": _MLflow}
