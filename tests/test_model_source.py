"""``model.model_name_or_path`` as a Hub id: found in the local Hugging Face cache, offline, or refused with
what to do. The cache is built here in the layout ``huggingface_hub`` writes (refs/main -> snapshots/<rev>)."""

from pathlib import Path

import pytest

from ds_scalora.train.config import ConfigError, load_config

TINY = Path(__file__).resolve().parents[1] / "ds_configs" / "tiny.yaml"
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A cache holding ``tiny-org/tiny-llama`` (a saved random Llama and the byte tokenizer)."""
    import huggingface_hub.constants
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_scalora.train.model import byte_tokenizer

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / REV
    tok = byte_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(snapshot)  # fmt: skip
    tok.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(TINY.parent)
    return snapshot


def test_a_hub_id_in_the_local_cache_loads_and_stays_a_hub_id(hub_cache):
    from ds_scalora.train.model import load_tokenizer, local_model_dir

    cfg = load_config(str(TINY), ["model.random_init=null", "model.model_name_or_path=tiny-org/tiny-llama"])
    assert cfg.model.model_name_or_path == "tiny-org/tiny-llama"  # stored portably, not as the snapshot path
    assert Path(local_model_dir(cfg)) == hub_cache
    assert load_tokenizer(cfg).chat_template is not None


def test_a_hub_id_not_in_the_cache_says_how_to_get_it(hub_cache):
    with pytest.raises(ConfigError, match=r"'tiny-org/other' is not a directory, nor a Hub id in the local Hugging "
                                          r"Face cache .*huggingface-cli download tiny-org/other"):
        load_config(str(TINY), ["model.random_init=null", "model.model_name_or_path=tiny-org/other"])
