"""Run-config loading and validation: every bad input names the key and what to do."""

import json

import pytest

from ds_scalora.train.config import ConfigError, load_config


@pytest.fixture
def good(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "model").mkdir()
    cfg = {"model": {"path": str(tmp_path / "model")}, "data": {"train": str(tmp_path / "train.jsonl")},
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
        ("trian.max_steps=3", "unknown key 'trian'; did you mean train"),
        ("train.max_steps=many", "train.max_steps must be int, got 'many'"),
        ("train.max_steps=0", "train.max_steps must be >= 1"),
        ("method.name=scalor", "method.name must be one of .* did you mean 'scalora'"),
        ("method.scalora.strength=-1", "strength must be a positive number or 'auto'"),
        ("model.path=/nonexistent/model", "model.path '/nonexistent/model' is not a directory"),
        ("data.train=/nonexistent.jsonl", "data.train '/nonexistent.jsonl' does not exist"),
        ("deepspeed=/nonexistent.json", "deepspeed '/nonexistent.json' is not a file"),
        ("deepspeed={optimizer: {type: Adam}}", "remove the deepspeed.optimizer block"),
        ("train.max_steps", "expected dotted.key=value"),
    ],
)
def test_bad_input_names_the_key(good, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(good), [override])


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
