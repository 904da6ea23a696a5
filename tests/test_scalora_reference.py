"""The single-process ScaLoRA reference on real PEFT LoRA layers of a tiny Llama."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ds_scalora import ScaLoRA, ScaLoRAConfig
from ds_scalora.spectrum import numerical_rank
from tiny_models import adamw, fixed_batch, relative, tiny_lora_model


def _train(model, opt, scalora, steps, seed0=0, refresh=True):
    """The documented loop: backward, refresh_if_due, clip, step. Returns the losses."""
    losses = []
    for i in range(steps):
        loss = model(**fixed_batch(seed=seed0 + i)).loss
        loss.backward()
        if refresh:
            scalora.refresh_if_due()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("solver", ["column", "scalar", "nnls"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_refresh_preserves_the_function_fp32(solver, use_rslora):
    """Logits before and after a refresh agree to 1e-5 relative in float32.

    The refresh changes W by s·A diag(1−αβ) Bᵀ and A Bᵀ by the opposite; each is rounded once in
    float32 (~6e-8 relative), so 1e-5 leaves a wide margin while catching any real error (a wrong
    orientation, a missing scale, a crossed α/β changes logits by far more than 1e-3).
    """
    model = tiny_lora_model(torch.float32, use_rslora=use_rslora)
    opt = adamw(model)
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(solver=solver, strength=0.5, warmup_steps=100))
    _train(model, opt, scalora, 3)  # make lora_B non-zero
    batch = fixed_batch(seed=7)
    model(**batch).loss.backward()
    before = _logits(model, batch)
    report = scalora.refresh()
    assert report.layers == 14 and report.merged_norm > 1e-3  # something real was merged
    assert report.solvers[solver] > 0
    assert relative(_logits(model, batch), before) < 1e-5


def test_refresh_preserves_the_function_bf16_default_policy():
    """bf16 base weights, fp32 adapters (PEFT's default upcast), the default precision policy.

    The forward only ever sees W rounded to bf16, so the logits can move by the effect of re-rounding
    W. Tolerance: twice the rounding noise of a bf16 forward itself, measured as the distance between
    this model's bf16 logits and the logits of an fp32 copy of the same weights.
    """
    model = tiny_lora_model(torch.bfloat16)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    opt = adamw(model)
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(warmup_steps=100))
    assert scalora.core.policies[0].name == "fp32_residual"
    _train(model, opt, scalora, 3)
    batch = fixed_batch(seed=7)
    model(**batch).loss.backward()
    before = _logits(model, batch)
    noise = relative(before, _logits(copy.deepcopy(model).float(), batch))
    scalora.refresh()
    change = relative(_logits(model, batch), before)
    assert change < 2 * noise, (change, noise)


def test_crossed_gradients_equal_autograd_at_the_new_factors():
    """After a refresh, .grad holds exactly what autograd computes at the rescaled factors (float64)."""
    model = tiny_lora_model(torch.float64)
    opt = adamw(model)
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(strength="auto", warmup_steps=100))
    _train(model, opt, scalora, 3)
    batch = fixed_batch(seed=9)
    model(**batch).loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    report = scalora.refresh()
    assert report.layers - report.solvers["none"] == 14
    crossed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.zero_grad()
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            # same float64 graph at the same effective weight: agreement to accumulated rounding
            torch.testing.assert_close(p.grad, crossed[n], rtol=1e-9, atol=1e-12 * float(crossed[n].abs().max()))
    # and the re-expression really changed them (the test could not pass by doing nothing)
    assert all(not torch.allclose(crossed[n], before[n], rtol=1e-3) for n in before)


def test_adam_moments_cross_and_step_counter_is_untouched():
    """m_A·β, v_A·β², m_B·α, v_B·α²; Adam's step counter and the learning rate are not reset."""
    model = tiny_lora_model(torch.float64)
    opt = adamw(model)
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(strength=0.3, warmup_steps=100))
    _train(model, opt, scalora, 4)
    layer = scalora.layers[3]
    sA, sB = opt.state[layer.lora_B], opt.state[layer.lora_A]
    old = {k: v.clone() for k, v in [("mA", sA["exp_avg"]), ("vA", sA["exp_avg_sq"]), ("mB", sB["exp_avg"]), ("vB", sB["exp_avg_sq"])]}
    steps = (sA["step"].clone(), sB["step"].clone())
    A_old, B_old = layer.A.detach().clone(), layer.B.detach().clone()
    model(**fixed_batch(seed=11)).loss.backward()
    scalora.refresh()
    # recover α, β from the factors themselves (independent of the solver's return value)
    alpha = (layer.A.detach() / A_old).nanmean(0)
    beta = (layer.B.detach() / B_old).nanmean(0)
    torch.testing.assert_close(sA["exp_avg"], old["mA"] * beta, rtol=1e-12, atol=0)
    torch.testing.assert_close(sA["exp_avg_sq"], old["vA"] * beta**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(sB["exp_avg"], old["mB"] * alpha[:, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(sB["exp_avg_sq"], old["vB"] * alpha[:, None] ** 2, rtol=1e-12, atol=0)
    assert torch.equal(sA["step"], steps[0]) and torch.equal(sB["step"], steps[1])
    assert not torch.allclose(alpha, torch.ones_like(alpha))


def test_high_rank_accumulation_is_real():
    """After 40 refreshes at r = 2 the accumulated update has rank well above r; plain LoRA's is <= r.

    float64 model so that the rank threshold (1e-8 of the largest singular value) sits far above
    rounding (~1e-16) and far below the genuine directions.
    """
    ranks = {}
    for method in ("scalora", "lora"):
        model = tiny_lora_model(torch.float64, r=2)
        opt = adamw(model, lr=3e-3)
        scalora = ScaLoRA(model, opt, ScaLoRAConfig(interval=1, warmup_steps=1))
        W0 = {layer.name: layer.weight.detach().clone() for layer in scalora.layers}
        _train(model, opt, scalora, 40, refresh=(method == "scalora"))
        ranks[method] = [numerical_rank(scalora.effective_weight(l) - W0[l.name], rtol=1e-8) for l in scalora.layers]
        if method == "scalora":
            # The logged estimate (random sketch Y = ΔW Ω, k = 64 >= every d_in here) against the brute-force
            # rank of W_now - W_0. Ω (d_in x k, full row rank) moves every singular value by a factor within
            # [σ_min(Ω), σ_max(Ω)], so the sketch's count at rtol = 1e-3 lies between the exact counts at
            # 1e-3·κ(Ω) and 1e-3/κ(Ω): directions that close to the threshold may fall either way.
            for i, l in enumerate(scalora.layers):
                sketch = scalora.core.sketches[i]
                sv = torch.linalg.svdvals(sketch.omega().double())
                kappa = float(sv[0] / sv[-1])
                delta = scalora.effective_weight(l) - W0[l.name]
                low, high = numerical_rank(delta, rtol=1e-3 * kappa), numerical_rank(delta, rtol=1e-3 / kappa)
                assert low <= sketch.rank(l.A, l.B, l.scale) <= high, (l.name, low, high, kappa)
    print("accumulated ranks (r=2): scalora", ranks["scalora"], "lora", ranks["lora"])
    assert max(ranks["lora"]) <= 2
    assert min(ranks["scalora"]) >= 8  # min(d_out, d_in) is 16 or 32 here


def test_schedule_warmup_interval_and_nonfinite_gradients():
    config = ScaLoRAConfig(interval=10, warmup_steps=5)
    assert [s for s in range(40) if config.is_due(s)] == [5, 15, 25, 35]
    # the rank sketches are measured at the first refresh of each window of rank_sketch_every steps
    # (brute force: scan the refreshes in order, remembering the windows already measured)
    for interval, warmup, every in [(1, 10, 10), (3, 0, 10), (10, 5, 10), (4, 2, 7), (2, 1, 1), (25, 3, 10)]:
        config = ScaLoRAConfig(interval=interval, warmup_steps=warmup, rank_sketch_every=every)
        seen, expected = set(), []
        for s in (s for s in range(200) if config.is_due(s)):
            if s // every not in seen:
                seen.add(s // every)
                expected.append(s)
        assert [s for s in range(200) if config.is_due(s) and config.is_measured(s)] == expected
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="rank_sketch_every"):
            ScaLoRAConfig(rank_sketch_every=bad)
    model = tiny_lora_model(torch.float32)
    opt = adamw(model)
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(interval=2, warmup_steps=1))
    reports = []
    for i in range(5):
        model(**fixed_batch(seed=i)).loss.backward()
        reports.append(scalora.refresh_if_due())
        opt.step()
        opt.zero_grad()
    assert [r is not None for r in reports] == [False, True, False, True, False]
    # rank_sketch_every 10: the first refresh measures its sketches, the next (step 3, same window) does not
    assert len(reports[1].accumulated_rank) == 14 and reports[3].accumulated_rank == []
    # a NaN gradient in one layer: the whole refresh is skipped (the step would be skipped or
    # corrupt anyway) and counted; nothing is touched
    model(**fixed_batch(seed=9)).loss.backward()
    scalora.layers[0].lora_A.grad[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = scalora.refresh()
    assert report.reasons["nonfinite"] == 14 and report.solvers["none"] == 14
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert scalora.totals["reason/nonfinite"] == 14
    # an Inf likewise (the refresh checks its joined buffer with one float64 sum, which carries either)
    scalora.layers[0].lora_A.grad[0, 0] = float("inf")
    assert scalora.refresh().reasons["nonfinite"] == 14
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # finite factors whose merge s·A·diag(1 − α∘β) overflows fp32: refused before any layer is written
    opt.zero_grad()
    model(**fixed_batch(seed=11)).loss.backward()
    saved_B = scalora.layers[5].lora_B.detach().clone()
    with torch.no_grad():
        scalora.layers[5].lora_B.copy_(torch.full_like(saved_B, 3e38))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="overflow"):
        scalora.refresh()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        scalora.layers[5].lora_B.copy_(saved_B)
    # solve_scaling itself also refuses a non-finite layer (tested in test_scaling); and a finite
    # step afterwards refreshes normally
    opt.zero_grad()
    model(**fixed_batch(seed=10)).loss.backward()
    assert scalora.refresh().solvers["none"] == 0


def test_resume_from_state_dicts_reproduces_the_run():
    """Stop at step 6, restore model, optimizer and ScaLoRA state, continue: identical losses (fp32 CPU)."""
    def fresh():
        model = tiny_lora_model(torch.bfloat16)
        opt = adamw(model)
        return model, opt, ScaLoRA(model, opt, ScaLoRAConfig(interval=2, warmup_steps=1))

    model, opt, scalora = fresh()
    _train(model, opt, scalora, 6)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), scalora.state_dict()))
    reference = _train(model, opt, scalora, 5, seed0=6)
    model2, opt2, scalora2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    scalora2.load_state_dict(saved[2])
    assert _train(model2, opt2, scalora2, 5, seed0=6) == reference


def test_refuses_what_it_cannot_rescale():
    with pytest.raises(ValueError, match="DoRA"):
        ScaLoRA(tiny_lora_model(use_dora=True), torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    model = tiny_lora_model()
    with pytest.raises(ValueError, match="optimizer does not train"):
        ScaLoRA(model, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="get_peft_model"):
        ScaLoRA(plain, torch.optim.AdamW(plain.parameters()))
    with pytest.raises(ValueError, match="interval"):
        ScaLoRAConfig(interval=0)
    with pytest.raises(ValueError, match="precision"):
        ScaLoRAConfig(precision="fp8")
    # an optimizer whose per-element state has no rescaling rule is refused at the first refresh
    model = tiny_lora_model()
    opt = torch.optim.Adagrad([p for p in model.parameters() if p.requires_grad])
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(warmup_steps=1))
    _train(model, opt, scalora, 1)
    model(**fixed_batch()).loss.backward()
    with pytest.raises(ValueError, match="'sum'"):
        scalora.refresh()


def test_gpt2_style_fan_in_fan_out_layers():
    """Conv1D-style layers (weight stored d_in x d_out) merge in their own layout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    opt = adamw(model)
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(strength=0.5, warmup_steps=100))
    _train(model, opt, scalora, 3)
    batch = fixed_batch(seed=3)
    model(**batch).loss.backward()
    before = _logits(model, batch)
    scalora.refresh()
    assert relative(_logits(model, batch), before) < 1e-5
