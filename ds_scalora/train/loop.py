"""The training run behind ``launch/train.py``, top to bottom: setup, loop, eval, checkpoints, summary."""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import time

import torch
import torch.distributed as dist

from ..zero.ds_config import fill_auto
from . import best, checkpoints, schedule
from .config import ConfigError, RunConfig, check_batch_keys, check_method, reporters
from .data import IGNORE, collate, load_rows, pack, tokenize
from .methods import method_of
from .model import load_model, load_tokenizer
from .reporters import open_reporters


class Diverged(RuntimeError):
    """The run stopped on train.divergence_patience bad steps in a row; summary.json records it."""


class FinalModelError(RuntimeError):
    """Training finished and its checkpoint is intact, but writing ``<output_dir>/model`` failed (rank 0)."""


def deepspeed_config(cfg: RunConfig, world: int) -> dict:
    """The run's DeepSpeed config: the given one (inline or JSON file) with "auto" values filled."""
    ds = cfg.deepspeed
    if isinstance(ds, str):
        with open(ds) as f:
            ds = json.load(f)
    ds = ds or {"zero_optimization": {"stage": 2}}
    check_batch_keys(ds, cfg, world)
    t = cfg.train
    ds = fill_auto(ds, micro_batch=t.per_device_train_batch_size, gradient_accumulation=t.gradient_accumulation_steps,
                   gradient_clipping=t.max_grad_norm, world=world, bf16=cfg.model.dtype == "bf16")
    ds.setdefault("steps_per_print", 10**9)
    return ds


def size_run(cfg: RunConfig, rows: int, world: int, rank: int) -> None:
    """Fix ``train.max_steps`` from ``num_train_epochs`` once the training rows are counted (schedule.run_length),
    and check the method's config against that length."""
    steps = schedule.run_length(cfg.train, rows, world)
    if cfg.train.max_steps <= 0 and rank == 0:
        print(f"{cfg.train.num_train_epochs:g} epoch(s) of {rows} training rows: {steps} optimizer steps")
    cfg.train.max_steps = steps
    check_method(cfg)


def lr_scheduler(optimizer, cfg: RunConfig):
    """``transformers.get_scheduler`` as ``train.*`` names it, times the method's own factor (ReLoRA's re-warm-up)."""
    try:
        return schedule.scheduler(optimizer, cfg.train, cfg.train.max_steps, method_of(cfg).lr_factor(cfg))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.lr_scheduler_type {cfg.train.lr_scheduler_type!r} with train.lr_scheduler_kwargs "
                          f"{cfg.train.lr_scheduler_kwargs}: {e}") from None


def _batch(examples, rows: list, pad_id: int) -> dict:
    lengths = None if examples.seq_lengths is None else [examples.seq_lengths[i] for i in rows]
    return collate([examples.input_ids[i] for i in rows], [examples.labels[i] for i in rows], pad_id, lengths)


def run(cfg: RunConfig, hooks=None) -> dict:
    """Train as ``cfg`` says; returns the summary. ``hooks`` (benchmarks): an object whose optional
    ``after_setup(engine, model)``, ``after_training(engine, model, evaluate)`` (``evaluate()``: the held-out
    loss of the model as it is then, no generation; collective) and ``before_summary(engine, model, summary)``
    are called on every rank."""
    from ..deepspeed_import import import_deepspeed
    from ..zero import disable_cpu_shm_comm
    from ..zero.single_process import one_rank_if_not_launched

    deepspeed = import_deepspeed()

    disable_cpu_shm_comm()  # on CPU: no 75 s op build, no leaked /dev/shm buffers
    one_rank_if_not_launched()  # `python launch/train.py`: one rank, as `deepspeed --num_gpus 1`
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = deepspeed_config(cfg, world)
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    tokenizer = load_tokenizer(cfg)
    train, held_out = _datasets(cfg, tokenizer, rank)
    size_run(cfg, len(train), world, rank)
    model = load_model(cfg, ds_config, len(tokenizer))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    scheduler = lr_scheduler(optimizer, cfg)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    try:
        return _train(cfg, hooks, engine, model, tokenizer, scheduler, train, held_out, rank, world)
    finally:
        # ZeRO's hooks hold the model through reference cycles that pass through C++, which the garbage
        # collector cannot see: without this, every in-process run (the benchmark runs dozens) kept its
        # model and optimizer state alive (about 0.5 GB per SmolLM2-135M run). Local: no collectives.
        engine.destroy()


def _train(cfg: RunConfig, hooks, engine, model, tokenizer, scheduler, train, held_out, rank: int, world: int) -> dict:
    """The training loop of :func:`run` on an initialised engine."""
    from tqdm import tqdm

    method = method_of(cfg)
    controller = method.attach(engine, model, cfg)
    if hooks is not None and hasattr(hooks, "after_setup"):
        hooks.after_setup(engine, model)

    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    global_batch = micro * gas * world
    start, history, resumed_stop = 0, [], None
    resume = checkpoints.resolve_resume(cfg.train.resume_from_checkpoint, cfg.train.output_dir)
    if rank == 0 and checkpoints.incomplete_tags(cfg.train.output_dir):
        print(f"warning: ignoring interrupted checkpoints {checkpoints.incomplete_tags(cfg.train.output_dir)}")
    if resume is not None:
        client = checkpoints.load(engine, controller, *resume)
        start, history = int(client["step"]), list(client.get("history", []))
        resumed_stop = client.get("stopped_early")  # a run that stopped early has nothing left to train
        checkpoints.check_resumed_step(start, cfg.train.max_steps, os.path.join(*resume))
        checkpoints.check_resumed_batch(client, global_batch, cfg.train.allow_batch_change, os.path.join(*resume))
        if rank == 0:
            finished = (" (train.max_steps: nothing left to train; the outputs are written again)" if start == cfg.train.max_steps
                        else " (it had stopped early: nothing left to train; the outputs are written again)" if resumed_stop else "")
            print(f"resumed from {os.path.join(*resume)} at step {start}{finished}")

    writer = _reporters(cfg) if rank == 0 else None
    if cfg.train.eval_on_start and start == 0:
        baseline = {"step": 0, **evaluate(engine, tokenizer, held_out, cfg, rank, world)}
        history.append(baseline)
        if rank == 0:
            print(f"before training: {baseline}")
            if writer is not None:
                for key, value in baseline.items():
                    if key != "step":
                        writer.add_scalar(key, value, 0)
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    tokens, t0, last_tps, last_logged = 0, time.perf_counter(), None, start
    bad_streak, diverged, stopped_early = 0, None, resumed_stop
    for step in range(start, start if stopped_early else cfg.train.max_steps):
        rows = _global_rows(step, global_batch, len(train), cfg.train.seed)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for k in range(gas):
            mine = rows[(rank * gas + k) * micro : (rank * gas + k + 1) * micro]
            batch = _batch(train, mine, tokenizer.pad_token_id)
            tokens += sum(len(train.input_ids[i]) for i in mine)
            loss = engine(**{key: v.to(engine.device) for key, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double().cpu()
        stats = _sum_over_ranks(torch.tensor([float(loss_sum) / gas, float(tokens)], dtype=torch.float64), engine.device)
        record = {"step": step + 1, "loss": float(stats[0]) / world, "lr": scheduler.get_last_lr()[0]}
        norm = engine.get_global_grad_norm()
        record["grad_norm"] = None if norm is None else float(norm)
        if controller is not None:
            record.update(method.record(controller))
        bad = _bad_step(record, engine)  # the loss and the norm are global: every rank agrees
        bad_streak = bad_streak + 1 if bad else 0
        done = step + 1 == cfg.train.max_steps
        evaluated = done or (cfg.train.eval_steps and (step + 1) % cfg.train.eval_steps == 0)
        if evaluated:
            record.update(evaluate(engine, tokenizer, held_out, cfg, rank, world,
                                   generate=done or cfg.eval.exact_match_every_eval))
        if (step + 1) % cfg.train.logging_steps == 0 or done:
            elapsed = time.perf_counter() - t0
            record["tokens_per_s"] = float(stats[1]) / max(elapsed, 1e-9)
            record["step_time_s"] = elapsed / (step + 1 - last_logged)
            last_logged = step + 1
            record["peak_memory_gib"] = _peak_memory_gib()
            tokens, t0 = 0, time.perf_counter()
            if writer is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "step" and not (method.log_prefix and key.startswith(method.log_prefix)):
                        writer.add_scalar(key, value, step + 1)
        if writer is not None and controller is not None:  # the method's own: at its refreshes or rounds
            method.tensorboard(writer, controller, record, step + 1, first=step == start)
        history.append(record)
        last_tps = record.get("tokens_per_s", last_tps)
        shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
        if last_tps is not None:
            shown["tok/s"] = f"{last_tps:.0f}"
        bar.set_postfix(shown)
        bar.update(1)
        patience = cfg.train.divergence_patience
        if patience and bad_streak >= patience:
            diverged = {"step": step + 1, "reason": bad, "steps_in_a_row": bad_streak}
            break
        waited = best.evaluations_without_improvement(history, cfg.train) if evaluated else 0
        if evaluated and cfg.train.early_stopping_patience and waited >= cfg.train.early_stopping_patience and not done:
            stopped_early = {"step": step + 1, "evaluations_without_improvement": waited}
        if (cfg.train.save_steps and (step + 1) % cfg.train.save_steps == 0) or done or stopped_early:
            if bad:  # never a bad state over a good checkpoint (save_total_limit would rotate the good one away)
                if rank == 0:
                    print(f"warning: step {step + 1}: {bad}; checkpoint not saved")
            else:
                record["saved"] = True  # in the history the checkpoint holds: the best saved evaluation is known on resume
                kept = _best_checkpoint_step(cfg, history)
                checkpoints.save(engine, controller, cfg.train.output_dir, step + 1,
                                 {"step": step + 1, "history": history, "config": cfg.to_dict(), "global_batch": global_batch,
                                  "stopped_early": stopped_early}, cfg.train.save_total_limit, keep_step=kept)  # fmt: skip
        if stopped_early:
            if rank == 0:
                print(f"early stopping at step {step + 1}: {cfg.train.early_stopping_patience} evaluation(s) without "
                      f"improving {best.metric(cfg.train)}")
            break
    bar.close()
    if hooks is not None and hasattr(hooks, "after_training"):  # the trained model as the last evaluation saw it
        hooks.after_training(engine, model, lambda: evaluate(engine, tokenizer, held_out, cfg, rank, world, generate=False))
    if controller is not None and diverged is None:
        method.finish(cfg, controller, rank)
    summary = _summary(cfg, history, method.summary(controller, history) if controller is not None else {}, world)
    summary["diverged"] = diverged
    summary["stopped_early"] = stopped_early
    summary["best"] = _best_summary(cfg, history)
    final_error = None
    if rank == 0 and diverged is None:  # the other ranks go on to the end and wait there
        final_step = _best_checkpoint_step(cfg, history) or (stopped_early or {}).get("step") or cfg.train.max_steps
        summary["final_model"], final_error = _final_model(cfg, final_step)
    if hooks is not None and hasattr(hooks, "before_summary"):
        hooks.before_summary(engine, model, summary)
    if rank == 0:
        with open(os.path.join(cfg.train.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if writer is not None:
            writer.close()
        print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "config")}, indent=2))
    if final_error is not None:
        raise FinalModelError(final_error)
    if diverged is not None:
        good = checkpoints.complete_tags(cfg.train.output_dir)
        raise Diverged(f"training diverged: {diverged['reason']} for {diverged['steps_in_a_row']} steps in a row (up to "
                       f"step {diverged['step']}; train.divergence_patience={cfg.train.divergence_patience}). Lower "
                       "train.learning_rate or raise train.warmup_steps; "
                       + (f"the newest good checkpoint is {good[-1]} (train.resume_from_checkpoint=auto continues from it)" if good
                          else "no checkpoint was saved") + f". Its history is in {cfg.train.output_dir}/summary.json")
    return summary


def _best_checkpoint_step(cfg: RunConfig, history: list) -> int | None:
    """With ``train.load_best_model_at_end``: the step of the best evaluation that has a checkpoint."""
    if not cfg.train.load_best_model_at_end:
        return None
    record = best.best_record(history, cfg.train, saved_only=True)
    return None if record is None else record["step"]


def _best_summary(cfg: RunConfig, history: list) -> dict | None:
    record = best.best_record(history, cfg.train)
    if record is None:
        return None
    key = best.metric(cfg.train)
    return {"metric": key, "value": record[key], "step": record["step"], "checkpoint_step": _best_checkpoint_step(cfg, history)}


def _final_model(cfg: RunConfig, step: int) -> tuple[dict | None, str | None]:
    """Write ``<output_dir>/model`` from the checkpoint of ``step`` (rank 0): (summary entry, error message or None)."""
    from ..checkpoint.layout import checkpoint_root, is_complete, tag_for
    from ..export.final_model import FINAL_MODEL_DIR, final_kind, write_final_model

    kind = final_kind(cfg.method.name, cfg.checkpoint.final_model)
    if kind is None:
        return None, None
    tag = os.path.join(checkpoint_root(cfg.train.output_dir), tag_for(step))
    if not is_complete(tag):  # the last step was bad (train.divergence_patience not reached): nothing to export
        print(f"warning: no final model: the checkpoint of step {step} was not saved")
        return None, None
    try:
        entry = write_final_model(tag, cfg.train.output_dir, cfg.checkpoint.final_model)
    except Exception as e:  # noqa: BLE001 - the run's checkpoint is intact: say so and how to retry
        return {"error": f"{type(e).__name__}: {e}"}, (
            f"training finished and {tag} is complete, but writing the final model failed ({type(e).__name__}: {e}). "
            f"Retry with: python tools/convert.py {kind} {tag} {os.path.join(cfg.train.output_dir, FINAL_MODEL_DIR)} --overwrite")
    print(f"final model ({entry['kind']}, step {entry['step']}): {entry['path']}")
    return entry, None


def _bad_step(record: dict, engine) -> str | None:
    """Why this step's state is bad (a non-finite loss, or a non-finite or exactly zero gradient norm: at a
    huge learning rate the weights overflow and every gradient vanishes), or None. Under fp16's dynamic
    loss scaling a skipped step's norm says nothing, so only the loss counts there."""
    if not math.isfinite(record["loss"]):
        return f"loss {record['loss']}"
    norm = record.get("grad_norm")
    if norm is None or engine.fp16_enabled():
        return None
    if not math.isfinite(norm) or norm == 0.0:
        return f"gradient norm {norm}"
    return None


def _datasets(cfg: RunConfig, tokenizer, rank: int):
    d = cfg.data
    rows = load_rows(d.train)
    if d.eval:
        train_rows, eval_rows = rows, load_rows(d.eval)
    elif d.eval_fraction > 0 and len(rows) > 1:
        split = rows.train_test_split(test_size=d.eval_fraction, seed=cfg.train.seed)
        train_rows, eval_rows = split["train"], split["test"]
    else:
        train_rows, eval_rows = rows, None
    train = tokenize(train_rows, tokenizer, d.format, d.max_length, d.train, d.mask_history)
    held_out = tokenize(eval_rows, tokenizer, d.format, d.max_length, d.eval or d.train, d.mask_history) if eval_rows else None
    if rank == 0:
        for name, ex in (("train", train), ("eval", held_out)):
            for reason, positions in (ex.skipped.items() if ex else []):
                print(f"warning: {name}: skipped {len(positions)} row(s), {reason}: positions {positions[:10]}"
                      f"{' ...' if len(positions) > 10 else ''}")
    if d.packing:
        train = pack(train, d.max_length)
    return train, held_out


def _global_rows(step: int, size: int, n: int, seed: int) -> list[int]:
    """Rows of the global batch of ``step``: a fresh permutation per epoch, a function of the step only."""
    out = []
    for idx in range(step * size, (step + 1) * size):
        epoch, pos = divmod(idx, n)
        out.append(int(_epoch_order(n, seed, epoch)[pos]))
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@torch.no_grad()
def evaluate(engine, tokenizer, held_out, cfg: RunConfig, rank: int, world: int, generate: bool = True) -> dict:
    """Held-out loss and perplexity (token-weighted), exact match of greedy answers if asked, and the
    evaluation's seconds (``eval_runtime``, as transformers' Trainer names it: what a run's evaluations
    cost beside its training steps)."""
    if held_out is None:
        return {}
    started = time.perf_counter()
    engine.eval()
    micro = cfg.train.per_device_eval_batch_size or cfg.train.per_device_train_batch_size
    rows = list(range(len(held_out)))[: cfg.eval.max_batches * micro]  # the same rows at every world size
    sums = torch.zeros(4, dtype=torch.float64)  # loss·tokens, tokens, exact, answered
    per_rank = math.ceil(len(rows) / world)
    mine = rows[rank * per_rank : (rank + 1) * per_rank]
    for i in range(0, per_rank, micro):  # every rank runs the same number of forwards (ZeRO-3)
        idx = mine[i : i + micro] or rows[:1]
        batch = collate([held_out.input_ids[j] for j in idx], [held_out.labels[j] for j in idx], tokenizer.pad_token_id)
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        n = float((batch["labels"][:, 1:] != IGNORE).sum()) if mine[i : i + micro] else 0.0
        sums[0] += float(loss) * n
        sums[1] += n
    if cfg.eval.exact_match and generate:
        synced = engine.zero_optimization_stage() == 3
        for i in range(0, per_rank, micro):  # the same number of generate calls on every rank (ZeRO-3)
            idx = [mine[k] if k < len(mine) else rows[0] for k in range(i, min(i + micro, per_rank))]
            if held_out.prompts[idx[0]] is None:
                continue
            texts = greedy_answers(engine.module, tokenizer, [held_out.prompts[j] for j in idx],
                                   cfg.eval.max_new_tokens, synced)  # fmt: skip
            for k, (j, text) in enumerate(zip(idx, texts)):
                if i + k < len(mine):
                    sums[2] += float(text == held_out.answers[j])
                    sums[3] += 1
    sums = _sum_over_ranks(sums, engine.device)
    engine.train()
    result = {}
    if sums[1] > 0:
        result["eval_loss"] = float(sums[0] / sums[1])
        result["eval_ppl"] = math.exp(min(result["eval_loss"], 50))
    if sums[3] > 0:
        result["eval_exact_match"] = float(sums[2] / sums[3])
    result["eval_runtime"] = time.perf_counter() - started
    return result


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list, max_new_tokens: int, synced_gpus: bool = False) -> list[str]:
    """Greedy completions of token-id ``prompts``, generated as one left-padded batch (one call instead
    of one per prompt); each is cut at its first end-of-sequence token, where one-prompt-at-a-time
    generation stops, and decoded."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, synced_gpus=synced_gpus)  # fmt: skip
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    texts = []
    for row in out[:, width:].tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return texts


def _sum_over_ranks(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor summed over ranks, through the engine's device: NCCL reduces device tensors
    only (a CPU tensor fails there), gloo either."""
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def _reporters(cfg: RunConfig):
    """TensorBoard, wandb and MLflow as ``train.report_to`` names them (rank 0), or None."""
    try:
        return open_reporters(reporters(cfg.train.report_to), cfg.train.output_dir, cfg.to_dict())
    except ImportError as e:
        raise ConfigError(str(e)) from None


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _summary(cfg: RunConfig, history: list, method_keys: dict, world: int) -> dict:
    last = history[-1] if history else {}
    evals = [h for h in history if "eval_loss" in h]
    start = evals[0] if evals and evals[0]["step"] == 0 else None
    return {
        "method": cfg.method.name,
        "steps": last.get("step"),
        "world_size": world,
        "final_loss": last.get("loss"),
        "eval": {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")},
        "eval_before_training": None if start is None else {k: v for k, v in start.items() if k.startswith("eval_")},
        # one schema for every method: ScaLoRA's keys are null where the method (train/methods.py) sets none
        "scalora_totals": None,
        "scalora_accumulated_rank": None,
        "scalora_energy_outside_top_r": None,
        **method_keys,
        "config": cfg.to_dict(),
        "history": history,
    }
