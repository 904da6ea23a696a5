"""Precision policies for merging small ScaLoRA updates into a frozen weight.

ScaLoRA periodically folds an fp32 update ``delta`` (typically 1e-3 of the
weight's magnitude or less) into a weight W that is often stored in bf16.
A bf16 ulp is 2**-7 relative, so ``W += delta`` done in bf16 rounds most of
the update away: measured on a 1e-3-sized update, the relative error of the
merged update was 1.84 -- worse than not merging at all.

The forward pass always sees W in its own dtype. The policies below keep the
exact accumulated value *beside* W (a residual, a low word, or an unbiased
rounding), so nothing is lost across many merges.

Every operation is elementwise and shape-agnostic, so the same code runs on a
full replica or on a flat 1-D ZeRO-3 shard. Randomness only comes from a
``torch.Generator`` seeded explicitly per call, so data-parallel replicas that
see identical inputs and seeds stay bit-identical.
"""
from __future__ import annotations

import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED = _LOW_PRECISION + (torch.float32, torch.float64)


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of ``tensors`` is finite, with one host sync: the extremes carry any NaN (it
    propagates through min and max) and any ±Inf, in one pass per tensor, with neither the boolean mask of
    ``isfinite`` nor the float64 conversion of a sum (which a large finite buffer could also overflow)."""
    extremes = [x for t in tensors if t.numel() for x in torch.aminmax(t.detach().view(-1))]
    return not extremes or bool(torch.isfinite(torch.stack([x.to(extremes[0].device, torch.float64)
                                                            for x in extremes])).all())


def _acc_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype: at least twice the weight's precision where it matters."""
    return torch.float32 if weight_dtype in _LOW_PRECISION else torch.float64


def _out_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _add_nearest_(weight: torch.Tensor, delta: torch.Tensor) -> None:
    acc = _acc_dtype(weight.dtype)
    weight.copy_(weight.to(acc) + delta.to(acc))


# Elements of a low-rank merge formed at a time (merge_product_). On a CPU about 1 MiB of fp32, so a
# block of the product stays in cache between being formed and being added; on an accelerator 64 MiB,
# so that a 12B model's refresh is hundreds of kernel launches, not tens of thousands.
BLOCK_ELEMENTS = 1 << 18
BLOCK_ELEMENTS_ACCELERATOR = 1 << 24


class MergePolicy:
    """How ``weight (+ state) += delta`` is accumulated. Subclasses implement ``_merge``."""

    name = ""
    # whether a merge may be split into blocks of rows (False: the stochastic policy draws its noise
    # over the whole call in flat order, so a split would change the draw)
    blockwise = True

    def state_bytes_per_param(self, weight_dtype: torch.dtype) -> int:
        """Extra persistent bytes per weight element this policy keeps."""
        return 0

    def init_state(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Zero state tensor beside ``weight`` (same shape and device), or None."""
        return None

    def merge_(self, weight: torch.Tensor, delta: torch.Tensor,
               state: torch.Tensor | None, *, seed: int = 0) -> None:
        """In place: ``weight`` (and ``state``) now represent old value + ``delta``.

        All checks run before anything is written, so a rejected call leaves
        ``weight`` and ``state`` untouched.
        """
        self._check(weight, delta, state)
        self._merge(weight, delta, state, seed)

    def merge_product_(self, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, start: int,
                       state: torch.Tensor | None, *, seed: int = 0, checked: bool = False) -> None:
        """In place: ``weight`` (and ``state``), a flat slice, now represent old value + elements
        ``[start, start + weight.numel())`` of the flattened product ``left @ rightᵀ`` (rows x r and
        cols x r: a low-rank merge, formed in ``left``'s dtype): fused into one ``addmm_`` where the
        policy is a plain add, else formed a block of rows at a time and merged, so no temporary the size
        of the weight exists and the weight is read and written once; a non-finite factor is refused
        before anything is written (``checked``: the caller has checked the factors finite, as a refresh
        does for all its layers at once, saving a device sync per layer)."""
        n, cols = weight.numel(), right.shape[0]
        self._check_target(weight, state)
        if not checked and not all_finite(left, right):
            raise ValueError(f"merge factors of shapes {tuple(left.shape)} and {tuple(right.shape)} contain NaN or Inf")
        if n == 0:
            return
        row0, row1 = start // cols, (start + n - 1) // cols + 1
        first, last = row0 + (start % cols != 0), row1 - ((start + n) % cols != 0)  # the whole rows
        if last > first and self._fuses(weight.dtype):
            # the whole rows in one fused product-and-add (BLAS blocks it for the cache itself), the
            # partial first and last rows, if any, formed below
            lo, hi = first * cols - start, last * cols - start
            inner = weight[lo:hi].view(last - first, cols)
            inner.addmm_(left[first:last].to(weight.dtype), right.T.to(weight.dtype))
            blocks = [(r0, r1) for r0, r1 in ((row0, first), (last, row1)) if r1 > r0]
        else:
            block = BLOCK_ELEMENTS if weight.device.type == "cpu" else BLOCK_ELEMENTS_ACCELERATOR
            step = max(1, block // cols) if self.blockwise else row1 - row0
            blocks = [(r0, min(row1, r0 + step)) for r0 in range(row0, row1, step)]
        for r0, r1 in blocks:
            lo, hi = max(start, r0 * cols) - start, min(start + n, r1 * cols) - start
            part = None if state is None else state[lo:hi]
            if hi - lo == (r1 - r0) * cols and self._add_product_block_(weight[lo:hi].view(r1 - r0, cols), left[r0:r1],
                                                                        right, None if part is None else part.view(r1 - r0, cols)):
                continue
            skip = lo + start - r0 * cols
            delta = (left[r0:r1] @ right.T).reshape(-1)[skip : skip + hi - lo]
            self._merge(weight[lo:hi], delta, part, seed)

    def _fuses(self, dtype: torch.dtype) -> bool:
        """Whether whole rows of a product merge as one fused ``addmm_`` into the weight (the policy's
        arithmetic is a plain add in the weight's dtype, with no state)."""
        return False

    def _add_product_block_(self, weight, left, right, state) -> bool:
        """Merge ``left @ rightᵀ`` into a block of whole rows (2-D views) without forming it apart, where
        the policy can; False: the block's product is formed and goes through ``_merge``."""
        return False

    def value(self, weight: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """Best estimate of the accumulated weight: fp32 (fp64 for fp64 weights)."""
        return weight.to(_out_dtype(weight.dtype))

    def _merge(self, weight, delta, state, seed) -> None:
        raise NotImplementedError

    def _check(self, weight, delta, state) -> None:
        self._check_target(weight, state)
        if not delta.is_floating_point():
            raise ValueError(f"delta must be floating point, got {delta.dtype}")
        if delta.shape != weight.shape or delta.device != weight.device:
            raise ValueError(f"delta shape {tuple(delta.shape)} on {delta.device} does not match "
                             f"weight shape {tuple(weight.shape)} on {weight.device}")
        # One host sync per merge; merges are rare and a NaN would poison W for good.
        if not all_finite(delta):
            raise ValueError(f"delta of shape {tuple(delta.shape)} contains NaN or Inf")

    def _check_target(self, weight, state) -> None:
        if weight.dtype not in _SUPPORTED:
            raise ValueError(f"unsupported weight dtype {weight.dtype}; expected one of {_SUPPORTED}")
        if state is not None and (state.shape != weight.shape or state.device != weight.device):
            raise ValueError(f"state shape {tuple(state.shape)} on {state.device} does not match "
                             f"weight shape {tuple(weight.shape)} on {weight.device}")
        needs_state = self.state_bytes_per_param(weight.dtype) > 0
        if needs_state != (state is not None):
            raise ValueError(f"policy {self.name!r} expects state={'a tensor' if needs_state else 'None'}, "
                             f"got {'None' if state is None else 'a tensor'}")


class NaivePolicy(MergePolicy):
    """Round-to-nearest ``weight + delta``. Exact enough for fp32/fp64 weights only."""

    name = "naive"

    def _merge(self, weight, delta, state, seed) -> None:
        if weight.dtype in (torch.float32, torch.float64):
            weight.add_(delta.to(weight.dtype))  # one correctly rounded add; no fp64 round trip
        else:
            _add_nearest_(weight, delta)

    def _fuses(self, dtype: torch.dtype) -> bool:
        return dtype in (torch.float32, torch.float64)


class Fp32ResidualPolicy(MergePolicy):
    """Error feedback: a residual r with ``weight + r == exact value``.

    Update is Kahan-style, ``c = r + delta; t = w + c; w' = round(t);
    r' = c - (w' - w)``, where ``w' - w`` is exact, so the rounding error of W
    is carried forward instead of dropped. r is fp32 (fp64 for fp64 weights);
    for an fp32 weight it doubles the precision.
    """

    name = "fp32_residual"

    def _state_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if weight_dtype == torch.float64 else torch.float32

    def state_bytes_per_param(self, weight_dtype: torch.dtype) -> int:
        return self._state_dtype(weight_dtype).itemsize

    def init_state(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(weight, dtype=self._state_dtype(weight.dtype))

    def _merge(self, weight, delta, state, seed) -> None:
        acc = _acc_dtype(weight.dtype)
        old = weight.to(acc, copy=True)  # not an alias when the weight is at acc precision (fp64)
        carry = state.to(acc) + delta.to(acc)
        weight.copy_(old + carry)
        state.copy_(carry - (weight.to(acc) - old))

    def _add_product_block_(self, weight, left, right, state) -> bool:
        """``_merge``'s arithmetic with the product accumulated straight into the residual (``addmm_``):
        carry = r + L Rᵀ; w' = round(w + carry); r' = carry − (w' − w), in cache-sized blocks."""
        acc = _acc_dtype(weight.dtype)
        if state.dtype != acc:  # the carry must be formed at the accumulation precision (bf16_pair's is not)
            return False
        state.addmm_(left.to(acc), right.T.to(acc))  # the carry
        old = weight.to(acc, copy=True)  # a copy even when the weight is at acc precision already
        weight.copy_(old + state)
        state.sub_(weight.to(acc, copy=True).sub_(old))  # w' − w is exact
        return True

    def value(self, weight: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        acc = _acc_dtype(weight.dtype)
        return (weight.to(acc) + state.to(acc)).to(_out_dtype(weight.dtype))


class Bf16PairPolicy(Fp32ResidualPolicy):
    """Compensated (hi, lo) pair with lo in the weight's own dtype: half the
    memory of ``fp32_residual``, about twice the weight's mantissa bits.
    The rounding error of lo itself is lost each merge."""

    name = "bf16_pair"

    def _state_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return weight_dtype


class StochasticPolicy(MergePolicy):
    """Unbiased stochastic rounding of ``weight + delta``; no extra state.

    Each element rounds up with probability proportional to its distance from
    the lower neighbour, so E[new W] = W + delta, at the price of noise of
    order one ulp per merge. Noise comes from a generator seeded with ``seed``
    on W's device and is drawn in the tensor's logical flat order: the result
    depends on (seed, flat index) but not on the shape. A shard therefore needs
    its own seed (e.g. derived from its offset); it does not reproduce the
    matching slice of a full-tensor merge.

    * bf16: add a uniform 16-bit integer to the fp32 bit pattern and truncate
      the low 16 bits (bf16 is the top half of fp32), rounding up with
      probability exactly low_bits / 2**16.
    * fp16: take the nearest value and its neighbour on the other side of x
      (``torch.nextafter``) and move to the neighbour with probability
      |x - nearest| / |neighbour - nearest|.
    * fp32/fp64 weights: same as ``naive``.
    """

    name = "stochastic"
    blockwise = False

    def _merge(self, weight, delta, state, seed) -> None:
        if weight.dtype not in _LOW_PRECISION:
            _add_nearest_(weight, delta)
            return
        x = weight.float() + delta.float()
        gen = torch.Generator(device=weight.device)
        gen.manual_seed(seed)
        if weight.dtype == torch.bfloat16:
            noise = torch.randint(0, 1 << 16, (x.numel(),), generator=gen,
                                  dtype=torch.int32, device=x.device).view(x.shape)
            bits = (x.view(torch.int32) + noise) & -(1 << 16)
            weight.copy_(bits.view(torch.float32))
            return
        nearest = x.to(weight.dtype)
        err = x - nearest.float()
        toward = torch.where(err > 0, float("inf"), float("-inf")).to(weight.dtype)
        other = torch.nextafter(nearest, toward)
        p_other = err.abs() / (other.float() - nearest.float()).abs()
        u = torch.rand((x.numel(),), generator=gen, device=x.device).view(x.shape)
        weight.copy_(torch.where(u < p_other, other, nearest))


_POLICIES = {p.name: p for p in (NaivePolicy, Fp32ResidualPolicy, Bf16PairPolicy, StochasticPolicy)}
POLICY_NAMES = tuple(_POLICIES)


def get_policy(name: str, weight_dtype: torch.dtype) -> MergePolicy:
    """Policy by name. ``"auto"`` is ``fp32_residual`` for bf16/fp16 weights and
    ``naive`` for fp32/fp64 weights, where plain addition is already exact enough."""
    if weight_dtype not in _SUPPORTED:
        raise ValueError(f"unsupported weight dtype {weight_dtype}; expected one of {_SUPPORTED}")
    if name == "auto":
        name = "fp32_residual" if weight_dtype in _LOW_PRECISION else "naive"
    if name not in _POLICIES:
        raise ValueError(f"unknown merge policy {name!r}; valid names: 'auto', "
                         + ", ".join(repr(n) for n in POLICY_NAMES))
    return _POLICIES[name]()
