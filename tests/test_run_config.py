"""Run-config loading and validation: every bad input names the key and what to do."""

import json
from pathlib import Path

import pytest
import yaml

from ds_scalora.train.config import ConfigError, load_config
from ds_scalora.train.loop import deepspeed_config


@pytest.fixture
def good(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "model").mkdir()
    cfg = {"model": {"model_name_or_path": str(tmp_path / "model")}, "data": {"train": str(tmp_path / "train.jsonl")},
           "method": {"name": "scalora", "scalora": {"interval": 10}}, "train": {"max_steps": 5}}  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_loads_and_applies_overrides(good):
    cfg = load_config(str(good), ["train.max_steps=7", "method.name=lora", "method.scalora.strength=0.5",
                                  "train.output_dir=/tmp/x", "method.scalora.interval=1"])  # fmt: skip
    assert cfg.train.max_steps == 7 and cfg.method.name == "lora" and cfg.train.output_dir == "/tmp/x"
    assert cfg.method.scalora.strength == 0.5 and cfg.method.scalora.interval == 1
    assert cfg.train.learning_rate == 2e-4  # defaults fill the rest


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_step=3", "unknown key 'train.max_step'; did you mean train.max_steps"),
        ("train.per_device_train_batch=3", "did you mean train.per_device_train_batch_size"),
        ("method.lora_alpah=3", "did you mean method.lora_alpha"),
        ("train.lr_scheduler_type=cosine_with_minlr", "lr_scheduler_type must be one of .* did you mean 'cosine_with_min_lr'"),
        ("train.report_to=wandbb", "train.report_to: 'wandbb' is not supported; .* \(did you mean 'wandb'"),
        ("method.target_modules=all", "method.target_modules must be a list of module names or 'all-linear'"),
        ("data.chat_template=missing.jinja", "data.chat_template 'missing.jinja' is neither a Jinja template"),
        (("train.max_steps=-1", "train.num_train_epochs=0"), "num_train_epochs must be > 0"),
        (("train.warmup_ratio=0.1", "train.warmup_steps=5"), "warmup_steps or train.warmup_ratio, not both"),
        ("trian.max_steps=3", "unknown key 'trian'; did you mean train"),
        ("train.max_steps=many", "train.max_steps must be int, got 'many'"),
        ("train.max_steps=0", "train.max_steps must be > 0, or -1 to train num_train_epochs"),
        ("method.name=scalor", "method.name must be one of .* did you mean 'scalora'"),
        ("method.scalora.strength=-1", "strength must be a positive number or 'auto'"),
        ("model.model_name_or_path=/nonexistent/model", "model.model_name_or_path '/nonexistent/model' is not a directory"),
        ("data.train=/nonexistent.jsonl", "data.train '/nonexistent.jsonl' does not exist"),
        ("deepspeed=/nonexistent.json", "deepspeed '/nonexistent.json' is not a file"),
        ("deepspeed={optimizer: {type: Adam}}", "remove the deepspeed.optimizer block"),
        ("train.max_steps", "expected dotted.key=value"),
        (("method.name=elalora", "method.elalora.init_warmup=0.9"), "method.elalora: ElaLoRA init_warmup"),
        (("method.name=elalora", "method.elalora.max_rank=2"), "method.elalora: ElaLoRA max_rank .2. must be >= init_rank"),
        (("method.name=elalora", "method.elalora.beta1=1.5"), "method.elalora: ElaLoRA beta1 must be in"),
    ],
)
def test_bad_input_names_the_key(good, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(good), [override] if isinstance(override, str) else list(override))


def test_elalora_schedule_resolves_fractions_of_the_run(good):
    from ds_scalora.train.config import elalora_config

    cfg = load_config(str(good), ["method.name=elalora", "train.max_steps=200", "method.r=4",
                                  "method.elalora.final_warmup=30"])  # fmt: skip
    e = elalora_config(cfg)
    assert (e.total_steps, e.init_rank, e.max_rank, e.init_warmup, e.final_warmup) == (200, 4, 8, 20, 30)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(str(tmp_path / "list.yaml"))


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path, monkeypatch):
    """Every run config in ds_configs/ validates (hardware ones with a stand-in model directory) and its
    DeepSpeed block resolves at 1 and 8 ranks with the batch arithmetic the run config implies."""
    monkeypatch.chdir(tmp_path)  # relative data paths must resolve from the config's own directory
    raw = yaml.safe_load(path.read_text())
    sets = []
    name = raw["model"].get("model_name_or_path")
    if name and not name.startswith("package:"):
        (tmp_path / "model").mkdir()
        sets.append(f"model.model_name_or_path={tmp_path / 'model'}")
    cfg = load_config(str(path), sets)
    assert Path(cfg.data.train).is_file()
    for world in (1, 8):
        ds = deepspeed_config(cfg, world)
        t = cfg.train
        assert ds["train_batch_size"] == t.per_device_train_batch_size * t.gradient_accumulation_steps * world
        assert ds["bf16"]["enabled"] == (cfg.model.dtype == "bf16")
        assert ds["zero_optimization"]["stage"] in (2, 3)


def test_hardware_config_without_its_model_says_how_to_set_it():
    path = Path(__file__).resolve().parents[1] / "ds_configs" / "gpu1_zero2.yaml"
    with pytest.raises(ConfigError, match=r"model.model_name_or_path .* is not a directory.*--set model.model_name_or_path="):
        load_config(str(path))


def test_deepspeed_values_must_agree_with_the_run_config(good, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu is 8 but train.per_device_train_batch_size is 4"):
        load_config(str(good), [f"deepspeed={ds}"])
    cfg = load_config(str(good), [f"deepspeed={ds}", "train.per_device_train_batch_size=8"])
    assert deepspeed_config(cfg, 2)["train_batch_size"] == 16
    ds.write_text(json.dumps({"train_batch_size": 64, "gradient_accumulation_steps": "auto"}))
    cfg = load_config(str(good), [f"deepspeed={ds}"])
    assert deepspeed_config(cfg, 16)["gradient_accumulation_steps"] == 1
    with pytest.raises(ConfigError, match=r"train_batch_size is 64 but micro batch 4 x accumulation 1 x 2 ranks = 8"):
        deepspeed_config(cfg, 2)
    ds.write_text(json.dumps({"optimizer": {"type": "Adam"}}))  # in a JSON file as inline: refused
    with pytest.raises(ConfigError, match="remove the deepspeed.optimizer block"):
        load_config(str(good), [f"deepspeed={ds}"])


def test_relative_paths_resolve_from_the_config_directory(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "t.jsonl").write_text('{"text": "a"}\n')
    (conf / "ds.json").write_text("{}")
    (conf / "run.yaml").write_text(
        "model: {random_init: {hidden_size: 8}}\ndata: {train: data/t.jsonl}\ndeepspeed: ds.json\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(conf / "run.yaml"))
    assert cfg.data.train == str(conf / "data" / "t.jsonl") and cfg.deepspeed == str(conf / "ds.json")
    assert deepspeed_config(cfg, 1)["zero_optimization"] == {"stage": 2}  # the file is opened from anywhere


def test_floats_written_without_a_dot_are_read(good, tmp_path):
    """YAML 1.1 reads ``1e-3`` as a string; a float option takes it (and the --set form), text stays refused."""
    raw = yaml.safe_load(good.read_text())
    raw["train"]["learning_rate"] = "1e-3"
    assert isinstance(yaml.safe_load("x: 1e-3")["x"], str)  # the premise
    path = tmp_path / "dotless.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(str(path)).train.learning_rate == 1e-3
    assert load_config(str(good), ["train.learning_rate=5e-5"]).train.learning_rate == 5e-5
    assert load_config(str(good), ["method.scalora.strength=4e0"]).method.scalora.strength == 4.0
    assert load_config(str(good), ["method.scalora.strength=auto"]).method.scalora.strength == "auto"
    with pytest.raises(ConfigError, match="train.learning_rate must be float, got 'fast'"):
        load_config(str(good), ["train.learning_rate=fast"])


OLD_TINY = Path(__file__).resolve().parent / "data" / "tiny_0.1_names.yaml"


def test_old_names_still_load_as_the_new_ones_and_say_which(monkeypatch, tmp_path):
    """A 0.1 config (the old ds_configs/tiny.yaml, kept verbatim in tests/data) gives the very config the renamed
    file gives, and warns once per old key with the key to write instead; an old and a new name for the
    same key together are refused."""
    new = Path(__file__).resolve().parents[1] / "ds_configs" / "tiny.yaml"
    monkeypatch.chdir(new.parent)  # both files name data/ relative to ds_configs/
    with pytest.warns(FutureWarning) as caught:
        old_cfg = load_config(str(OLD_TINY), ["train.micro_batch_size=2", "logging.tensorboard=false"])
    messages = sorted(str(w.message) for w in caught)
    assert any("method.alpha is deprecated" in m and "write method.lora_alpha" in m for m in messages)
    assert any("checkpoint.keep_last is deprecated" in m and "write train.save_total_limit" in m for m in messages)
    assert any("--set train.micro_batch_size: deprecated" in m for m in messages) and len(messages) == 9  # 7 in the file, 2 --set
    new_cfg = load_config(str(new), ["train.per_device_train_batch_size=2", "train.report_to=none"])
    assert old_cfg.to_dict() == new_cfg.to_dict()
    both = tmp_path / "both.yaml"
    both.write_text(OLD_TINY.read_text().replace("  micro_batch_size: 4", "  micro_batch_size: 4\n  per_device_train_batch_size: 2"))
    with pytest.raises(ConfigError, match="both train.micro_batch_size .* and train.per_device_train_batch_size"):
        load_config(str(both))


def test_a_reporter_whose_package_is_missing_is_refused_with_the_pip_command(good, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to needs mlflow-skinny, which is not installed: pip install mlflow-skinny"):
        load_config(str(good), ["train.report_to=[tensorboard, mlflow]"])


def test_a_stored_old_config_reads_in_the_new_names():
    """Checkpoints written by 0.1 store the old names; the converters read them through the same table."""
    from ds_scalora.export.source import stored_config

    old = {"model": {"path": "/m", "dtype": "fp32"}, "method": {"name": "lora", "r": 4, "alpha": 8, "rslora": True},
           "train": {"seed": 0, "micro_batch_size": 4}, "logging": {"every": 1, "tensorboard": True}}  # fmt: skip
    new = stored_config(old)
    assert new["model"]["model_name_or_path"] == "/m" and new["method"]["lora_alpha"] == 8
    assert new["method"]["use_rslora"] is True and new["train"]["per_device_train_batch_size"] == 4
    assert new["train"]["report_to"] == "tensorboard" and "logging" not in new
    assert old["model"] == {"path": "/m", "dtype": "fp32"}  # the stored dict itself is left alone


def test_a_config_is_checked_before_any_heavy_import():
    """``launch/train.py`` validates its config before importing PEFT, transformers and DeepSpeed (the method
    configs live apart from their layers, the packages import lazily, ``ds_scalora.export`` imports its
    checkpoint reader on first use): only torch comes in before a typo is reported. DeepSpeed's package costs
    ~3-5 s on the 2-core machine (``python -X importtime``, 2026-12-03; 2.6 s of it is the ``mlflow`` its
    autotuner imports when installed)."""
    import subprocess
    import sys

    code = ("import sys; from ds_scalora.train.config import load_config; "
            "[load_config('ds_configs/tiny.yaml', [f'method.name={m}']) for m in ('scalora', 'elalora', 'relora')]; "
            "print(sorted(m for m in ('deepspeed', 'peft', 'transformers') if m in sys.modules))")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]", out


DS_JSONS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_shipped_deepspeed_jsons_take_the_batch_from_the_run_or_the_trainer(path, good):
    """Each shipped DeepSpeed JSON says "auto" where the value belongs to the run: with launch/train.py any
    batch, accumulation, clipping and dtype go through (``--set train.gradient_accumulation_steps=4`` was
    refused while the files held fixed numbers), and the HF Trainer's own filler
    (``HfTrainerDeepSpeedConfig``, what ``TrainingArguments(deepspeed=FILE)`` runs) fills the same keys
    from ``TrainingArguments`` without a mismatch."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    cfg = load_config(str(good), [f"deepspeed={path}", "train.gradient_accumulation_steps=4", "train.per_device_train_batch_size=3",
                                  "train.max_grad_norm=0.5", "model.dtype=bf16"])  # fmt: skip
    ds = deepspeed_config(cfg, 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 4, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert deepspeed_config(load_config(str(good), [f"deepspeed={path}", "model.dtype=fp32"]), 1)["bf16"]["enabled"] is False

    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=5, gradient_accumulation_steps=3,
                             max_grad_norm=0.25, bf16=True, use_cpu=True, report_to=[])  # fmt: skip
    hf = HfTrainerDeepSpeedConfig(str(path))
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, model=None, num_training_steps=10)  # raises on any mismatch
    filled = hf.config
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (5, 3)
    assert filled["gradient_clipping"] == 0.25 and filled["bf16"]["enabled"] is True
