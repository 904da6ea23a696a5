"""The model and tokenizer of a run, and the method applied to them (LoRA, rsLoRA, ScaLoRA, ElaLoRA, full).

Models load from a local directory or the local Hugging Face cache only (nothing is downloaded). Under ZeRO-3 the weights are
partitioned while they load (``HfDeepSpeedConfig`` / ``deepspeed.zero.Init``), so a model larger
than one device never has to fit on one. ``model.random_init`` builds a random Llama from config
fields, with a byte-level tokenizer made in code, for tests and CI.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from ..deepspeed_import import import_deepspeed
from .config import RunConfig
from .model_source import local_dir
from .packaged_models import is_packaged, materialize

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (259 tokens), built in code, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])  # fmt: skip
    fast.chat_template = CHATML
    return fast


def local_model_dir(cfg: RunConfig) -> str | None:
    """The local directory of ``model.model_name_or_path`` (a ``package:`` model converted once into the cache,
    by rank 0 while the others wait; a Hub id read from the local Hugging Face cache), or None (random init)."""
    path = cfg.model.model_name_or_path
    if path is None:
        return None
    if is_packaged(path):
        if not dist.is_initialized() or dist.get_rank() == 0:
            materialize(path)
        if dist.is_initialized():
            dist.barrier()
        return materialize(path)
    return local_dir(path)


# A random-init model up to this size is drawn on the host (CPU generator, seeded) and then moved to the
# accelerator, so that its weights are the same on every machine and an export can rebuild them on a CPU
# (export/source.py: the base an update is measured from). A CUDA generator draws other numbers from the same
# seed. Larger shapes (the GPU benchmark's 12B) are drawn on the accelerator: 12B parameters in bf16 would take
# 24 GB of host memory and minutes to initialise there; their base cannot be rebuilt elsewhere.
HOST_INIT_MAX_PARAMS = 2_000_000_000


def random_init_params(fields: dict) -> int:
    """Parameters of the random Llama that ``model.random_init`` fields (vocab_size included) describe,
    counted on the meta device (no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**fields)).parameters())


def random_init_on_host(fields: dict) -> bool:
    """Whether a run draws this random-init model on the host (:data:`HOST_INIT_MAX_PARAMS`)."""
    return random_init_params(fields) <= HOST_INIT_MAX_PARAMS


def load_tokenizer(cfg: RunConfig):
    """The run's tokenizer, with ``data.chat_template`` if given (the exports apply it too: export/source.py)."""
    from transformers import AutoTokenizer

    path = local_model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path) if path is not None else byte_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.data.chat_template:  # the template's text (load_config reads a file)
        tokenizer.chat_template = cfg.data.chat_template
    return tokenizer


def load_model(cfg: RunConfig, ds_config: dict, vocab_size: int):
    """The model with the run's method applied; partitioned at load under ZeRO-3."""
    deepspeed = import_deepspeed()  # first: without mlflow
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dtype = DTYPES[cfg.model.dtype]
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    keep_alive = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841 - must live during from_pretrained
    torch.manual_seed(cfg.train.seed)
    path = local_model_dir(cfg)
    kwargs = {"dtype": dtype}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        fields = {"vocab_size": vocab_size, **cfg.model.random_init}
        # built in its dtype, on the host up to HOST_INIT_MAX_PARAMS (reproducible anywhere), else on the
        # accelerator (under ZeRO-3, partitioned as it is built): a 12B shape built in fp32 on the host would
        # need ~73 GB of host memory and minutes of initialisation
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        if not zero3 and accelerator.device_name() != "cpu":
            accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # deepspeed.initialize would, later
        on_host = random_init_on_host(fields)
        where = contextlib.nullcontext() if zero3 else torch.device("cpu" if on_host else accelerator.current_device_name())
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3), where:
            model = LlamaForCausalLM._from_config(LlamaConfig(**fields), **kwargs)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return apply_method(model, cfg)


def load_model_and_tokenizer(cfg: RunConfig, ds_config: dict):
    """(model, tokenizer): :func:`load_tokenizer` and :func:`load_model`."""
    tokenizer = load_tokenizer(cfg)
    return load_model(cfg, ds_config, len(tokenizer)), tokenizer


def apply_method(model, cfg: RunConfig):
    """The run's method wraps the model (PEFT LoRA, ElaLoRA's SVD layers; ``full`` trains it as it is)."""
    from .methods import method_of

    return method_of(cfg).wrap(model, cfg)
