"""Task (b)'s diagnostics measure what they say: the KL's output metric Γ of a projection, from hooks and one
backward pass per batch, equals a float64 finite-difference reference built without hooks' gradients."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ds_scalora.bench import distill


def test_output_fisher_equals_finite_differences_in_float64():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=16)
    model = LlamaForCausalLM(config).double().eval()
    name = "model.layers.0.self_attn.o_proj"
    data = torch.randint(0, 16, (2, 5))
    (gamma,) = distill.output_fisher(model, [name], data, seed=3)

    # the same sampled tokens: output_fisher draws them from the model's own distribution with this generator
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=data).logits.float(), -1).reshape(-1, 16)
    sampled = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).view(data.shape)
    module = dict(model.named_modules())[name]
    shift = torch.zeros(2, 5, 8, dtype=torch.float64)
    handle = module.register_forward_hook(lambda m, i, out: out + shift)

    def total_log_prob():
        with torch.no_grad():
            return float(torch.log_softmax(model(input_ids=data).logits, -1).gather(-1, sampled[..., None]).sum())

    eps, grads = 1e-4, torch.zeros(2, 5, 8, dtype=torch.float64)
    try:
        for index in range(shift.numel()):  # central differences, one output coordinate of one token at a time
            shift.view(-1)[index] = eps
            up = total_log_prob()
            shift.view(-1)[index] = -eps
            grads.view(-1)[index] = (up - total_log_prob()) / (2 * eps)
            shift.view(-1)[index] = 0.0
    finally:
        handle.remove()
    g = grads.reshape(-1, 8)
    reference = g.T @ g / data.numel()
    assert reference.abs().max() > 1e-3  # the gradients are not vanishing: the comparison is not vacuous
    # Not float64 throughout: LlamaRMSNorm computes in float32 whatever the model's dtype, so the log-probability
    # carries ~1e-8 of rounding, ~1e-4 in a difference quotient at eps = 1e-4 (truncation, O(eps²), is ~1e-6 here),
    # and output_fisher's own log-softmax is float32 (relative 1e-7). Γ's entries are O(1): 1e-3 separates a
    # right Γ from a wrong one (another token sampled, a missing 1/count, a gradient of one position only).
    torch.testing.assert_close(gamma, reference, rtol=1e-3, atol=1e-3)


def test_teacher_cache_is_reused_and_pruned_least_recently_used_first(tmp_path, monkeypatch):
    """The cache returns a stored result without recomputing it, and keeps its folder under the size cap by
    deleting the files least recently used (a hit counts as a use), never the one just written."""
    import os

    monkeypatch.setenv("DS_SCALORA_CACHE", str(tmp_path))
    calls = []

    def compute(name, value):
        def f():
            calls.append(name)
            return [torch.full((256,), value)]  # 1 KiB of float32, plus torch.save's framing
        return f

    folder = tmp_path / "distill"
    for age, name in enumerate("abc"):
        distill.cached("t", name, compute(name, float(age)), limit=10**9)
        os.utime(folder / f"t-{name}.pt", (1000 + age, 1000 + age))  # a, then b, then c: distinct ages
    size = (folder / "t-a.pt").stat().st_size
    assert calls == list("abc")
    hit = distill.cached("t", "a", compute("a again", 9.0), limit=10**9)
    assert calls == list("abc") and torch.equal(hit[0], torch.zeros(256))  # stored, not recomputed
    distill.cached("t", "d", compute("d", 3.0), limit=3 * size)  # 4 files, room for 3: b, the oldest unused, goes
    assert sorted(p.name for p in folder.iterdir()) == ["t-a.pt", "t-c.pt", "t-d.pt"]
    distill.cached("t", "e", compute("e", 4.0), limit=size // 2)  # room for none: all but the new one go
    assert sorted(p.name for p in folder.iterdir()) == ["t-e.pt"]
