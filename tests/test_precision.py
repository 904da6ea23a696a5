"""Tests for ds_scalora.precision against an independent float64 reference."""
import math

import pytest
import torch

from ds_scalora.precision import POLICY_NAMES, get_policy

BF16 = torch.bfloat16
K_MERGES = 200
STEP = 1e-3  # each delta is ~1e-3 of |W| elementwise


def _deltas(w0: torch.Tensor, case: str, k: int, seed: int = 1234):
    """K fp32 deltas of size ~STEP*|W0|: independent signs ("random_walk") or a
    fixed sign per element with random magnitude in [0.5, 1.5] ("coherent")."""
    g = torch.Generator().manual_seed(seed)
    scale = STEP * w0.float().abs()
    sign = torch.randn(w0.shape, generator=g).sign()
    for _ in range(k):
        if case == "random_walk":
            yield scale * torch.randn(w0.shape, generator=g)
        else:
            yield scale * sign * (0.5 + torch.rand(w0.shape, generator=g))


def _merge_all(policy, w0, case, k=K_MERGES):
    """Applies K merges; returns (policy value, exact float64 accumulated update)."""
    w = w0.clone()
    state = policy.init_state(w)
    exact = torch.zeros(w0.shape, dtype=torch.float64)
    for i, d in enumerate(_deltas(w0, case, k)):
        policy.merge_(w, d, state, seed=i)  # fresh seed per merge, as a trainer would pass its step
        exact += d.double()
    return policy.value(w, state), exact


@pytest.fixture(scope="module")
def merge_errors():
    """{(case, policy): (relative error, bias)} for a 256x256 bf16 W over K merges.

    relative error = ||value - W0 - exact||_F / ||exact||_F
    bias = <err, exact> / <exact, exact>: -1 means the whole update was lost.
    """
    w0 = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)).to(BF16)
    out = {}
    for case in ("random_walk", "coherent"):
        for name in ("auto",) + POLICY_NAMES:
            value, exact = _merge_all(get_policy(name, BF16), w0, case)
            err = value.double() - w0.double() - exact
            rel = (err.norm() / exact.norm()).item()
            bias = ((err * exact).sum() / (exact * exact).sum()).item()
            out[case, name] = (rel, bias)
    print(f"\nbf16 W 256x256, K={K_MERGES} merges of ~{STEP:g}*|W|: relative error (bias)")
    print(f"{'policy':<22}{'random_walk':>22}{'coherent':>22}")
    for name in ("auto",) + POLICY_NAMES:
        label = "auto=fp32_residual" if name == "auto" else name
        cells = "".join(f"{out[c, name][0]:>12.3e} ({out[c, name][1]:+.3f})"
                        for c in ("random_walk", "coherent"))
        print(f"{label:<22}{cells}")
    return out


@pytest.mark.parametrize("case", ["random_walk", "coherent"])
def test_default_policy_keeps_update_naive_loses_it(merge_errors, case):
    # Default must match the float64 sum to 1e-3 relative (the spec); fp32
    # rounding of a value of size ~|W| is ~6e-8, far below that.
    assert merge_errors[case, "auto"][0] < 1e-3
    # Naive bf16 rounds away a 1e-3 update (bf16 half-ulp is ~2e-3 relative):
    # the error is of the order of the update itself.
    assert merge_errors[case, "naive"][0] > 0.1
    # lo in bf16 keeps ~16 mantissa bits: expect well over 20x better than naive.
    assert merge_errors[case, "bf16_pair"][0] < merge_errors[case, "naive"][0] / 20


def test_stochastic_is_unbiased_where_naive_is_biased(merge_errors):
    # Coherent case: naive loses most of the update (bias near -1). Stochastic
    # rounding's error is zero-mean noise; its projection onto the update over
    # 65536 elements has std ~ rel_err/256 (~3e-4 here), so 0.01 is a loose
    # bound that still sits far from naive's bias.
    assert merge_errors["coherent", "naive"][1] < -0.5
    assert abs(merge_errors["coherent", "stochastic"][1]) < 0.01
    # Along a coherent update the noise (~sqrt(K) ulps) is small against the
    # update (~K steps), so stochastic also beats naive in norm there.
    assert merge_errors["coherent", "stochastic"][0] < merge_errors["coherent", "naive"][0] / 5


def test_state_bytes_match_allocated_state():
    expected = {"naive": 0, "fp32_residual": 4, "bf16_pair": 2, "stochastic": 0}
    assert set(expected) == set(POLICY_NAMES)
    w = torch.randn(7, 5).to(BF16)
    for name, nbytes in expected.items():
        policy = get_policy(name, BF16)
        assert policy.state_bytes_per_param(BF16) == nbytes, name
        state = policy.init_state(w)
        allocated = 0 if state is None else state.element_size()
        assert allocated == nbytes, name
        if state is not None:
            assert state.shape == w.shape and state.device == w.device
            assert not state.any()


def _full_and_copy(policy, dtype=BF16, shape=(64, 48)):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    return w, policy.init_state(w)


def _copy(t):
    return None if t is None else t.clone()


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_replicas_stay_bit_identical(name):
    policy = get_policy(name, BF16)
    w_a, s_a = _full_and_copy(policy)
    w_b, s_b = w_a.clone(), _copy(s_a)
    for i, d in enumerate(_deltas(w_a, "random_walk", 20)):
        policy.merge_(w_a, d, s_a, seed=i)
        policy.merge_(w_b, d.clone(), s_b, seed=i)
    assert torch.equal(w_a, w_b)
    assert (s_a is None) or torch.equal(s_a, s_b)


def test_stochastic_seed_matters():
    policy = get_policy("stochastic", BF16)
    w0, _ = _full_and_copy(policy)
    d = next(_deltas(w0, "random_walk", 1))
    w_a, w_b = w0.clone(), w0.clone()
    policy.merge_(w_a, d, None, seed=1)
    policy.merge_(w_b, d, None, seed=2)
    # ~3000 elements each round up with probability up to 1/2; equality would need all to agree.
    assert not torch.equal(w_a, w_b)


@pytest.mark.parametrize("name", ["naive", "fp32_residual", "bf16_pair"])
def test_flat_shard_matches_slice_of_full_merge(name):
    """Deterministic policies are elementwise: a flat shard of (W, delta, state)
    merges bit-identically to the same slice of the full 2-D merge."""
    policy = get_policy(name, BF16)
    w_full, s_full = _full_and_copy(policy)
    lo, hi = 1000, 2345  # arbitrary shard boundaries, not row-aligned
    w_shard = w_full.flatten()[lo:hi].clone()
    s_shard = None if s_full is None else s_full.flatten()[lo:hi].clone()
    for i, d in enumerate(_deltas(w_full, "random_walk", 10)):
        policy.merge_(w_shard, d.flatten()[lo:hi].clone(), s_shard, seed=i)
        policy.merge_(w_full, d, s_full, seed=i)
    assert torch.equal(w_shard, w_full.flatten()[lo:hi])
    assert s_full is None or torch.equal(s_shard, s_full.flatten()[lo:hi])


def test_stochastic_is_shape_agnostic_and_unbiased_on_a_shard():
    """Stochastic noise follows (seed, flat index), not the shape: a 2-D merge
    equals the merge of its flattened copy. A shard (own seed) stays unbiased."""
    policy = get_policy("stochastic", BF16)
    w2d, _ = _full_and_copy(policy)
    w1d = w2d.flatten().clone()
    d = next(_deltas(w2d, "coherent", 1))
    policy.merge_(w2d, d, None, seed=7)
    policy.merge_(w1d, d.flatten(), None, seed=7)
    assert torch.equal(w2d.flatten(), w1d)

    # Shard of 20000 ones, each + 2**-9 (a quarter bf16 ulp at 1.0), merged 64
    # times with fresh seeds: exact mean increment is 64 * 2**-9 = 0.125.
    shard = torch.ones(20000, dtype=BF16)
    for i in range(64):
        policy.merge_(shard, torch.full((20000,), 2.0**-9), None, seed=100 + i)
    # Per element the sum of 64 roundings (each 0 or 2**-7, after the value
    # grows past 2 the ulp doubles) has std <= 8 * 2**-7 = 0.0625; the mean of
    # 20000 has std < 5e-4, so 3e-3 is a >6-sigma tolerance.
    assert abs(shard.double().mean().item() - 1.125) < 3e-3


def test_fp32_weights_auto_is_naive_and_matches_float64():
    policy = get_policy("auto", torch.float32)
    assert policy.name == "naive"
    w0 = torch.randn(128, 96, generator=torch.Generator().manual_seed(3))
    w, ref_stepwise = w0.clone(), w0.double()
    exact = w0.double()
    for i, d in enumerate(_deltas(w0, "coherent", K_MERGES)):
        policy.merge_(w, d, None, seed=i)
        # IEEE add of two fp32 numbers = exact (fp64) sum rounded once to fp32.
        ref_stepwise = (ref_stepwise + d.double()).float().double()
        exact += d.double()
    assert torch.equal(w.double(), ref_stepwise)
    # Against the exact sum: each merge rounds by <= half an fp32 ulp
    # (2**-24 relative), so after K merges |err| <= K * 2**-24 * |W| elementwise.
    bound = K_MERGES * 2.0**-24 * exact.abs().clamp_min(w0.double().abs())
    assert ((policy.value(w, None).double() - exact).abs() <= bound * 1.1).all()
    assert policy.value(w, None).dtype == torch.float32

    # fp32_residual on an fp32 weight carries the rounding error forward:
    # W + r then tracks the exact sum to ~fp32 rounding of the *final* value
    # (one half-ulp, 2**-24 relative) instead of K accumulated roundings.
    residual = get_policy("fp32_residual", torch.float32)
    w, r = w0.clone(), residual.init_state(w0)
    for i, d in enumerate(_deltas(w0, "coherent", K_MERGES)):
        residual.merge_(w, d, r, seed=i)
    err_naive = (ref_stepwise - exact).norm()
    err_resid = (residual.value(w, r).double() - exact).norm()
    assert err_resid < err_naive / 10


def test_fp64_weight_value_stays_fp64():
    for name in POLICY_NAMES:
        policy = get_policy(name, torch.float64)
        w = torch.ones(10, dtype=torch.float64)
        state = policy.init_state(w)
        policy.merge_(w, torch.full((10,), 1e-20, dtype=torch.float64), state)
        assert policy.value(w, state).dtype == torch.float64


def test_unknown_policy_name():
    with pytest.raises(ValueError, match=r"'fp8_magic'.*'auto'.*'naive'.*'stochastic'"):
        get_policy("fp8_magic", BF16)


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_delta_rejected_and_weight_unchanged(name, bad):
    policy = get_policy(name, BF16)
    w, state = _full_and_copy(policy)
    if state is not None:
        state.fill_(1e-3)  # non-zero so an accidental write would show
    w_before, s_before = w.clone(), _copy(state)
    delta = torch.full(w.shape, 1e-3)
    delta[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        policy.merge_(w, delta, state)
    assert torch.equal(w, w_before)
    assert state is None or torch.equal(state, s_before)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_shape_mismatch_rejected_and_weight_unchanged(name):
    policy = get_policy(name, BF16)
    w, state = _full_and_copy(policy)
    w_before = w.clone()
    with pytest.raises(ValueError, match=r"delta shape \(48, 64\).*weight shape \(64, 48\)"):
        policy.merge_(w, torch.zeros(48, 64), state)
    assert torch.equal(w, w_before)
    if state is not None:
        with pytest.raises(ValueError, match=r"state shape \(3072,\).*weight shape \(64, 48\)"):
            policy.merge_(w, torch.zeros(64, 48), state.flatten())
        assert torch.equal(w, w_before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("frac", [0.5, 0.25])
def test_stochastic_rounding_is_unbiased(dtype, sign, frac):
    """x sits `frac` of an ulp above 1.0 (or below -1.0); the mean of many
    stochastic roundings must be x. frac=0.5 is the exact midpoint."""
    n = 200_000
    ulp = torch.finfo(dtype).eps  # spacing of `dtype` on [1, 2)
    w = torch.full((n,), sign, dtype=dtype)
    get_policy("stochastic", dtype).merge_(w, torch.full((n,), sign * frac * ulp), None, seed=11)
    vals = set(w.unique().tolist())
    assert vals <= {sign, sign * (1 + ulp)}  # only the two neighbours
    # Fraction rounded away from 1.0 is Binomial(n, frac)/n with std
    # sqrt(frac(1-frac)/n) <= 1.2e-3; 6 sigma => 7e-3 tolerance, in ulps.
    mean_ulps = ((w.double() - sign).abs().mean() / ulp).item()
    assert abs(mean_ulps - frac) < 6 * math.sqrt(frac * (1 - frac) / n)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 50_000, 99_999])
def test_non_finite_entry_anywhere_in_a_large_delta_is_rejected(bad, where):
    """The check reads the extremes (one vectorised pass): a single bad entry at any position of a
    tensor large enough for the vectorised kernels must still be caught."""
    w = torch.zeros(100_000, dtype=torch.float32)
    delta = torch.full_like(w, 1e-3)
    delta[where] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_policy("naive", torch.float32).merge_(w, delta, None)
    assert torch.equal(w, torch.zeros_like(w))


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_merge_product_matches_merging_the_formed_delta(name, dtype, monkeypatch):
    """merge_product_ (blocks of rows, fused add where the policy allows) against merge_ of the formed
    delta, shard by shard over uneven flat shards that cut rows, with blocks of two rows so that every
    path (whole-row blocks, partial first and last rows) runs. Tolerance: the merged value to 1e-6
    relative where the policy accumulates in fp32 or better (the fused add rounds once, the formed
    delta twice), one bf16 ulp (2^-7) for round-to-nearest and stochastic bf16 weights."""
    import ds_scalora.precision as precision

    monkeypatch.setattr(precision, "BLOCK_ELEMENTS", 10)
    gen = torch.Generator().manual_seed(11)
    rows, cols, r = 7, 5, 3
    W0 = torch.randn(rows * cols, generator=gen).to(dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    L, R = (torch.randn(n, r, generator=gen).to(work) * 0.01 for n in (rows, cols))
    policy = get_policy(name, dtype)
    results = []
    for fused in (True, False):
        W = W0.clone()
        state = policy.init_state(W)
        for lo, hi in ((0, 3), (3, 17), (17, 20), (20, 35)):
            part = None if state is None else state[lo:hi]
            if fused:
                policy.merge_product_(W[lo:hi], L, R, lo, part, seed=lo)
            else:
                policy.merge_(W[lo:hi], (L @ R.T).reshape(-1)[lo:hi], part, seed=lo)
        results.append(policy.value(W, state))
    fp32_or_better = dtype != torch.bfloat16 or policy.state_bytes_per_param(dtype) >= 4
    tol = 1e-6 if fp32_or_better else 2**-7
    torch.testing.assert_close(results[0], results[1], rtol=tol, atol=tol)
    assert not torch.equal(results[0], W0.to(results[0].dtype))


def test_merge_product_refuses_non_finite_factors():
    policy = get_policy("fp32_residual", torch.bfloat16)
    W = torch.randn(12).bfloat16()
    state = policy.init_state(W)
    before = W.clone()
    L = torch.randn(4, 2)
    L[1, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        policy.merge_product_(W, L, torch.randn(3, 2), 0, state)
    assert torch.equal(W, before) and not state.any()


def test_all_finite_sees_every_nan_and_inf_and_no_overflow():
    """The refresh's one-pass finiteness check: any NaN or ±Inf anywhere in any tensor is seen; finite
    values whose sum would overflow (fp32 maxima, bf16 too) are finite; empty tensors are finite."""
    from ds_scalora.precision import all_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
        assert all_finite(big, -big, torch.empty(0, dtype=dtype)) and all_finite()
        for bad in (float("nan"), float("inf"), float("-inf")):
            for where in (0, 517, 999):
                t = torch.zeros(10, 100, dtype=dtype)
                t.view(-1)[where] = bad
                assert not all_finite(torch.ones(3, dtype=dtype), t), (dtype, bad, where)
