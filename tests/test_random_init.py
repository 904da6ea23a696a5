"""Where a ``model.random_init`` model is drawn: on the host up to ``HOST_INIT_MAX_PARAMS`` (so that its
weights are the same on every machine and an export can rebuild its base on a CPU), on the accelerator
above. The first H200 run (docs/gpu_runs.md) is why: a CUDA generator draws other numbers from the same
seed, so a base rebuilt on the CPU was silently not the run's."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ds_scalora.bench.grid import MISTRAL_NEMO_12B, TINYLLAMA_1B
from ds_scalora.train.model import random_init_on_host, random_init_params

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 262}


def test_parameter_count_on_meta_equals_a_real_build():
    real = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**TINY)).parameters())
    assert random_init_params(TINY) == real


def test_the_gpu_benchmark_shapes_fall_on_either_side():
    # TinyLlama's 1.1B is drawn on the host (reproducible by an export); Mistral-NeMo's 12.2B on the GPU
    assert 1.0e9 < random_init_params(TINYLLAMA_1B) < 1.2e9 and random_init_on_host(TINYLLAMA_1B)
    assert 12.0e9 < random_init_params(MISTRAL_NEMO_12B) < 12.5e9 and not random_init_on_host(MISTRAL_NEMO_12B)


def test_host_draw_is_what_an_export_rebuilds():
    """The run's construction (``_from_config`` in its dtype) and the export's (``LlamaForCausalLM(...).to``)
    give the same bf16 weights from the same seed on the host."""
    torch.manual_seed(7)
    run = LlamaForCausalLM._from_config(LlamaConfig(**TINY), dtype=torch.bfloat16).state_dict()
    torch.manual_seed(7)
    export = LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16).state_dict()
    assert run.keys() == export.keys()
    for k in run:
        assert torch.equal(run[k], export[k]), k
