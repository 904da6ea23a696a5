"""train.report_to's integrations, each read back through its own package's reader: TensorBoard's event
accumulator, MLflow's client on the file store, and wandb's offline run file decoded with wandb's own protobuf
schema. Nothing leaves the machine: wandb runs offline with its server address pointing at a closed local port."""

import glob
import json
import os
import struct

import psutil
import pytest
import torch

from ds_scalora.train import reporters
from ds_scalora.train.reporters import missing_packages, open_reporters

CONFIG = {"train": {"learning_rate": 2e-4, "report_to": ["mlflow"], "output_dir": "x" * 7000},
          "method": {"name": "scalora", "rank": 8, "extra": {}}}  # fmt: skip
LOSSES = {1: 2.5, 2: 1.25, 3: 0.625}


def _unset(monkeypatch, *names):
    for name in names:  # set first, so that teardown also removes what the module under test sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb and MLflow confined to tmp_path; WANDB_MODE unset so the module's offline default is what is tested."""
    _unset(monkeypatch, "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
           "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE")  # fmt: skip
    for name, value in {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                        "WANDB_DISABLE_CODE": "true", "WANDB_ERROR_REPORTING": "false",
                        "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
                        "HOME": str(tmp_path / "home")}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    return tmp_path


def _log(r):
    for step, loss in LOSSES.items():
        r.add_scalar("loss", loss, step)
    r.add_scalar("elalora_rank/q(proj)", 6, 3)
    r.add_histogram("scalora/alpha_beta", torch.tensor([0.5, 1.5, 4.0], requires_grad=True), 3)


def _wandb_processes():
    return [p for p in psutil.Process().children(recursive=True) if "wandb" in p.name()]


def test_nothing_named_opens_nothing(tmp_path):
    assert open_reporters([], str(tmp_path), CONFIG) is None
    assert open_reporters(["none"], str(tmp_path), CONFIG) is None
    assert os.listdir(tmp_path) == []


def test_tensorboard_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = open_reporters(["tensorboard"], str(tmp_path / "run"), CONFIG)
    _log(r)
    r.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("loss")} == LOSSES
    [(step, histogram)] = [(e.step, e.histogram_value) for e in acc.Histograms("scalora/alpha_beta")]
    assert (step, histogram.min, histogram.max, histogram.num) == (3, 0.5, 4.0, 3)


def test_mlflow_file_store(offline):
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    out = offline / "run-a"
    r = open_reporters(["mlflow"], str(out), CONFIG)
    _log(r)
    assert mlflow.active_run() is None  # the client API: no global active run
    r.close()
    client = MlflowClient(tracking_uri=f"file:{out}/mlruns")
    [run] = client.search_runs([client.get_experiment_by_name("ds-scalora").experiment_id])
    assert (run.info.run_name, run.info.status) == ("run-a", "FINISHED")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == list(LOSSES.items())
    assert run.data.metrics["elalora_rank/q_proj_"] == 6  # "(" and ")" are not allowed in MLflow names
    assert [run.data.metrics[f"scalora/alpha_beta/{s}"] for s in ("min", "mean", "max")] == [0.5, 2.0, 4.0]
    params = run.data.params
    assert (params["train.learning_rate"], params["method.rank"], params["method.extra"]) == ("0.0002", "8", "{}")
    assert params["train.report_to"] == "['mlflow']"
    assert params["train.output_dir"] == "x" * MAX_PARAM_VAL_LENGTH  # truncated, not rejected


def _wandb_records(path):
    """The records of a ``.wandb`` file. wandb 0.31 has no Python reader for it (the old ``DataStore`` moved into
    wandb-core), so this decodes its LevelDB-log framing (7-byte header, 32 KiB blocks, records split into
    FULL/FIRST/MIDDLE/LAST chunks behind a crc32-length-type header) into wandb's own protobuf ``Record``."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = open(path, "rb").read()
    assert data[:7] == b":W&B\xe1\xbe\x00", "unknown .wandb header: has wandb changed its file format?"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = Record()
            record.ParseFromString(chunks)
            yield record
            chunks = b""


def _history(records):
    """{step: {key: value}} from the history records; a histogram's parts are keyed (tag, part)."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows[record.history.step.num] = {
                item.key or ("/".join(item.nested_key) if len(item.nested_key) == 1 else tuple(item.nested_key)):
                json.loads(item.value_json) for item in items}  # fmt: skip
    return rows


def test_wandb_offline_run(offline):
    out = offline / "run-b"
    r = open_reporters(["wandb"], str(out), CONFIG)
    assert _wandb_processes()  # wandb-core serves the run
    _log(r)
    r.close()
    assert not _wandb_processes(), "close() must not leave wandb's service process running"
    [run_dir] = glob.glob(str(out / "wandb" / "offline-run-*"))  # offline without WANDB_MODE; not in WANDB_DIR
    [path] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    records = list(_wandb_records(path))
    [run] = [rec.run for rec in records if rec.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("run-b", "ds-scalora")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["method"] == CONFIG["method"] and config["train"]["learning_rate"] == 2e-4
    history = _history(records)
    assert {step: row["loss"] for step, row in history.items()} == LOSSES
    assert history[3]["elalora_rank/q(proj)"] == 6
    counts, bins = history[3][("scalora/alpha_beta", "values")], history[3][("scalora/alpha_beta", "bins")]
    assert sum(counts) == 3 and (bins[0], bins[-1]) == (0.5, 4.0)


def test_all_three_twice_in_one_process(offline):
    """A benchmark trains many runs in one process: each gets its own files, and none leaks into the next."""
    import mlflow
    import wandb
    from mlflow.tracking import MlflowClient

    for name in ("first", "second"):
        r = open_reporters(["tensorboard", "wandb", "mlflow"], str(offline / name), CONFIG)
        r.add_scalar("loss", 1.0, 1)
        r.close()
        assert wandb.run is None and mlflow.active_run() is None and not _wandb_processes()
    for name in ("first", "second"):
        assert len(glob.glob(str(offline / name / "tensorboard" / "events.out.tfevents.*"))) == 1
        assert len(glob.glob(str(offline / name / "wandb" / "offline-run-*"))) == 1
        client = MlflowClient(tracking_uri=f"file:{offline / name}/mlruns")
        [run] = client.search_runs([client.get_experiment_by_name("ds-scalora").experiment_id])
        assert (run.info.run_name, run.info.status, run.data.metrics) == (name, "FINISHED", {"loss": 1.0})


def test_a_failed_open_closes_what_it_opened(offline, monkeypatch):
    import wandb

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "no-such-scheme://nowhere")
    with pytest.raises(Exception, match="no-such-scheme"):
        open_reporters(["wandb", "mlflow"], str(offline / "run-c"), CONFIG)
    assert wandb.run is None and not _wandb_processes()


def test_missing_package_names_its_pip_requirement(tmp_path, monkeypatch):
    find_spec = reporters.importlib.util.find_spec
    monkeypatch.setattr(reporters.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "mlflow") else find_spec(name, *a))  # fmt: skip
    assert missing_packages(["tensorboard"]) == []
    assert missing_packages(["wandb", "tensorboard", "mlflow"]) == ["wandb", "mlflow-skinny"]
    with pytest.raises(ImportError, match="pip install wandb"):
        open_reporters(["tensorboard", "wandb"], str(tmp_path), CONFIG)
    assert os.listdir(tmp_path) == []  # checked before anything was opened
