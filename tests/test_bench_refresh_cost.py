"""The refresh benchmark times the refresh users run: its phase-by-phase replay (``refresh_cost.phases``)
leaves exactly the state ``RefreshCore.refresh`` leaves, so a change to the refresh that the replay does
not follow fails here instead of silently timing other work."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ds_scalora.bench import refresh_cost
from ds_scalora.methods import ScaLoRA, ScaLoRAConfig


def _state(scalora):
    out = []
    for layer in scalora.layers:
        out.append(layer.weight.detach().clone())
        for p in (layer.lora_A, layer.lora_B):
            out += [p.detach().clone(), p.grad.clone()]
            out += [v.clone() for k, v in sorted(scalora.optimizer.state[p].items()) if torch.is_tensor(v)]
    return out


def test_phases_replay_the_refresh_exactly():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    base = LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=refresh_cost.TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 16))
    for _ in range(3):  # lora_B leaves zero, Adam moments exist
        refresh_cost.train_step(model, opt, ids)
    model(input_ids=ids, labels=ids).loss.backward()
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(warmup_steps=0, interval=1, rank_sketch=8, shrink=4.0))
    saved, weights = refresh_cost.snapshot(scalora), [layer.weight.detach().clone() for layer in scalora.layers]
    before = _state(scalora)

    def restore():
        refresh_cost.restore(scalora, saved)
        for layer, w in zip(scalora.layers, weights):
            layer.weight.data.copy_(w)

    times = refresh_cost.phases(scalora)
    assert set(times) == set(refresh_cost.PHASES) and all(t >= 0 for t in times.values())
    replayed = _state(scalora)
    restore()
    assert all(torch.equal(a, b) for a, b in zip(_state(scalora), before))
    report = scalora.core.refresh(1)
    assert report.solvers.get("none", 0) == 0  # every layer was rescaled: the comparison is not vacuous
    refreshed = _state(scalora)
    assert len(refreshed) == len(replayed) == len(before)
    changed = sum(not torch.equal(a, b) for a, b in zip(refreshed, before))
    assert changed > len(before) // 2  # the refresh merged and rescaled (weights, factors, grads, moments)
    for a, b in zip(replayed, refreshed):
        assert torch.equal(a, b)
    # the roofline's kernel pass times the merge's addmm_ without changing any weight (it adds zero factors)
    assert refresh_cost.kernel_pass(scalora, 4) > 0
    assert all(torch.equal(a, b) for a, b in zip(_state(scalora), refreshed))


def test_gpu_shapes_take_their_layers_batch_dtype_and_report_file(monkeypatch):
    """``--device cuda --shape 12b`` measures the 12.2B reference shape at its own depth and batch, in bf16,
    into a report of its own (the CPU report stays); explicit options still win."""
    seen = {}
    monkeypatch.setattr(refresh_cost, "print_and_write", lambda report, args, out, title, command: seen.update(
        args=args, out=out, title=title, command=command))
    refresh_cost.main(["--device", "cuda", "--shape", "12b"])
    args = seen["args"]
    assert (args.layers, args.batch, args.dtype) == (40, [2, 2048], "bf16")
    assert seen["out"].endswith("benchmarks_refresh_12b_gpu.md") and "(GPU)" in seen["title"]
    assert seen["command"] == "python tools/benchmark.py refresh --device cuda --shape 12b"
    refresh_cost.main(["--shape", "1b", "--layers", "2", "--batch", "1", "16"])
    assert (seen["args"].layers, seen["args"].batch, seen["args"].dtype) == (2, [1, 16], None)
    assert seen["out"].endswith("benchmarks_refresh.md") and "(CPU)" in seen["title"]
    config = refresh_cost.SHAPES["1b"]
    assert config["hidden_size"] == 2048 and "num_hidden_layers" not in config
