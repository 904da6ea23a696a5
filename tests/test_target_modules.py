"""``method.target_modules: all-linear`` (the default) adapts the modules PEFT's own "all-linear" picks, for
every method of the run: every linear layer but the output head, whatever the architecture calls them."""

from pathlib import Path

import pytest
import torch

from ds_scalora.train.config import load_config
from ds_scalora.train.model import apply_method

TINY = Path(__file__).resolve().parents[1] / "ds_configs" / "tiny.yaml"


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))  # fmt: skip


def _adapted(model) -> set:
    names = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    return {name.split("base_model.model.", 1)[-1] for name in names}


def test_pefts_all_linear_on_llama_is_every_projection_but_the_head():
    from peft import LoraConfig, get_peft_model

    picked = _adapted(get_peft_model(_llama(), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")))
    expected = {f"model.layers.{i}.{part}" for i in range(2) for part in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    assert picked == expected  # the list the run config hard-coded before; lm_head is not adapted


@pytest.mark.parametrize("method", ["lora", "rslora", "scalora", "relora", "elalora"])
def test_every_method_adapts_what_peft_picks(method, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.chdir(TINY.parent)
    cfg = load_config(str(TINY), [f"method.name={method}"])
    assert cfg.method.target_modules == "all-linear"  # the default
    reference = _adapted(get_peft_model(_llama(), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")))
    assert _adapted(apply_method(_llama(), cfg)) == reference


def test_gpt2_conv1d_layers_are_linear_too(monkeypatch):
    """GPT-2 writes its projections as Conv1D: all-linear still finds them (and leaves the tied head alone)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.chdir(TINY.parent)
    cfg = load_config(str(TINY), ["method.name=lora"])
    gpt2 = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    ours = _adapted(apply_method(GPT2LMHeadModel(gpt2), cfg))
    reference = _adapted(get_peft_model(GPT2LMHeadModel(gpt2), LoraConfig(r=2, target_modules="all-linear")))
    assert ours == reference and {n.rsplit(".", 1)[-1] for n in ours} == {"c_attn", "c_proj", "c_fc"}
