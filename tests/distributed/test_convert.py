"""``tools/convert.py`` on real ``launch/train.py`` checkpoints (2 ranks, ScaLoRA, tiny random Llama).

Three runs (ZeRO-1 fp32, ZeRO-2 bf16, ZeRO-3 bf16; 6 steps, refreshes at steps 2 and 4, so merges are in
the frozen weights and, in bf16, in the fp32 residual shards), each followed by
``export_worker.py``, which loads the checkpoint into an engine and dumps its logits on a fixed batch,
its controller's full merged weights and the factors' fp32 masters: the references, taken from the
running engine and not from the files the converter reads. The three training launches, then one
launch of ``export_worker.py --plan`` for the three checkpoints (plan.py): 4 launches, ~2.5 min on 2 cores.

Tolerances: an exported fp32 weight vs the engine's float64 ``merged + s·B A``: 1e-6 relative (one fp32
rounding). Logits of the exported model (float64) vs the engine's: 1e-4 of max |logit| for the fp32 run;
for bf16 runs the engine computes in bf16 (unit roundoff 2^-8), so 3e-2 of max |logit|; dropping the
adapter's delta moves the logits by more than that, which the test checks too.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
from launch import _env, node_launcher, run_deepspeed_plan  # noqa: E402

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "ds_configs" / "tiny.yaml")
WORKER = Path(__file__).resolve().parent / "export_worker.py"
sys.path.insert(0, str(REPO / "tools"))
import convert  # noqa: E402
from test_train_entry import train  # noqa: E402

RUNS = {1: "fp32", 2: "bf16", 3: "bf16"}


def _sets(out, stage, dtype):
    return [f"train.output_dir={out}", "train.max_steps=6", "train.save_steps=6", "train.eval_steps=0",
            "train.eval_on_start=false", f"deepspeed.zero_optimization.stage={stage}", f"model.dtype={dtype}"]  # fmt: skip


def _train_and_export(root: Path) -> dict:
    """stage -> (run dir, engine reference dict): every stage's training run, then their references in one
    launch of the export worker."""
    sets, exports = {}, {}
    for stage, dtype in RUNS.items():
        sets[stage] = _sets(root / f"z{stage}", stage, dtype)
        cmd = node_launcher(2, REPO / "launch" / "train.py", ["--config", TINY, "--set", *sets[stage]])
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        tag = root / f"z{stage}" / "checkpoints" / "step00000006"
        exports[f"ref{stage}"] = ["--config", TINY, "--set", *sets[stage], "--checkpoint", tag]
    refs = run_deepspeed_plan(2, exports, root, worker=WORKER)
    return {stage: (root / f"z{stage}", refs[f"ref{stage}"]) for stage in RUNS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _train_and_export(tmp_path_factory.mktemp("convert"))


def _convert(*args):
    assert convert.main([*map(str, args), "--quiet"]) == 0


def _logits(model_dir, ids, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("stage", [1, 2, 3])  # the runs are shared with the PEFT and safety tests below
def test_merged_export_reproduces_the_engine(runs, stage, tmp_path):
    from safetensors.torch import load_file

    run, ref = runs[stage]
    out = tmp_path / "merged"
    _convert("merged", run, out, "--dtype", "fp32")  # the run dir: the newest complete tag is found
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(f))
    assert len(ref["layers"]) == 14
    for name, d in ref["layers"].items():
        want = d["merged_frozen"] + d["scale"] * d["lora_B"] @ d["lora_A"]
        got = saved[name].double()
        assert (got - want).norm() <= 1e-6 * want.norm(), name
    ids, engine = ref["input_ids"], ref["logits"]
    got = _logits(out, ids)
    tol = (1e-4 if RUNS[stage] == "fp32" else 3e-2) * engine.abs().max()
    assert (got - engine).abs().max() <= tol, float((got - engine).abs().max() / engine.abs().max())
    # the run's own final model (<output_dir>/model, merged for ScaLoRA, in the run's dtype) is the same model
    own = _logits(run / "model", ids)
    assert (own - engine).abs().max() <= (1e-4 if RUNS[stage] == "fp32" else 3e-2) * engine.abs().max()
    # the comparison can fail: the same model without the adapter's delta is far off
    for name, d in ref["layers"].items():
        saved[name] = d["merged_frozen"].float()
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    from safetensors.torch import save_file

    for f in bare.glob("*.safetensors"):
        save_file({k: saved[k] for k in load_file(f)}, f, metadata={"format": "pt"})
    assert (_logits(bare, ids) - engine).abs().max() > 3 * tol
    # default dtype: the run's own
    _convert("merged", run, tmp_path / "default")
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert config["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[RUNS[stage]]
    assert (tmp_path / "default" / "tokenizer.json").is_file() and (tmp_path / "default" / "generation_config.json").is_file()


def _reference_updates(ref, base_dir):
    """float64 ``ΔW = merged + s·B A − W_base`` from the engine's dump and the exported base model."""
    from safetensors.torch import load_file

    base = {}
    for f in Path(base_dir).glob("*.safetensors"):
        base.update(load_file(f))
    return {name.removesuffix(".weight"): d["merged_frozen"] + d["scale"] * d["lora_B"] @ d["lora_A"] - base[name].double()
            for name, d in ref["layers"].items()}  # fmt: skip


def _peft_weights(adapter_dir):
    """Per module, the float64 weight of base + adapter as stock PEFT computes it (merge_and_unload)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float64)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return {k.removesuffix(".weight"): v for k, v in model.state_dict().items()}, base


def test_peft_full_rank_reproduces_the_merged_model_and_low_rank_reports_its_tail(runs, tmp_path):
    from safetensors.torch import load_file

    run, ref = runs[2]  # ZeRO-2 bf16: merges live partly in the fp32 residual shards
    full = tmp_path / "full"
    _convert("peft", run, full, "--rank", "64")
    base_dir = full / "base_model"
    updates = _reference_updates(ref, base_dir)
    merged, _ = _peft_weights(full)
    base_sd = {k.removesuffix(".weight"): v.double() for k, v in load_file(next(base_dir.glob("*.safetensors"))).items()}
    for module, dW in updates.items():
        got = merged[module] - base_sd[module]
        assert (got - dW).norm() <= 1e-6 * dW.norm(), module  # fp32 factors of an exact factorization
    report = json.loads((full / "peft_export_report.json").read_text())
    assert report["overall_relative_error"] < 1e-12

    low = tmp_path / "low"
    _convert("peft", run, low, "--rank", "2")
    report = json.loads((low / "peft_export_report.json").read_text())
    merged, _ = _peft_weights(low)
    tail2 = total2 = 0.0
    for module, dW in updates.items():
        s = torch.linalg.svdvals(dW)
        want = math.sqrt(float((s[2:] ** 2).sum() / (s**2).sum()))
        actual = float((merged[module] - base_sd[module] - dW).norm() / dW.norm())
        assert report["modules"][module]["rank"] == 2
        assert abs(report["modules"][module]["relative_error"] - want) < 1e-6, module
        assert abs(actual - want) < 1e-5, module  # what PEFT computes is the reported tail
        assert want > 1e-3  # the cut is real
        tail2, total2 = tail2 + float((s[2:] ** 2).sum()), total2 + float((s**2).sum())
    assert abs(report["overall_relative_error"] - math.sqrt(tail2 / total2)) < 1e-6
    # default: 99% energy
    _convert("peft", run, tmp_path / "energy")
    report = json.loads((tmp_path / "energy" / "peft_export_report.json").read_text())
    assert all(m["relative_error"] <= math.sqrt(0.01) + 1e-9 for m in report["modules"].values())


def test_inspect_ranks_and_files(runs, tmp_path, capsys):
    run, ref = runs[1]
    _convert("peft", run, tmp_path / "p", "--rank", "1")  # only to get the base model written
    updates = _reference_updates(ref, tmp_path / "p" / "base_model")
    out = tmp_path / "inspect"
    _convert("inspect", run / "checkpoints", out)
    printed = capsys.readouterr().out
    result = json.loads((out / "inspect.json").read_text())
    for module, dW in updates.items():
        s = torch.linalg.svdvals(dW)
        assert result["modules"][module]["numerical_rank"] == int((s > 1e-3 * s[0]).sum()), module
        assert torch.allclose(torch.tensor(result["modules"][module]["singular_values"], dtype=torch.float64), s,
                              rtol=1e-6, atol=1e-9 * float(s[0]))  # fmt: skip
    # two refreshes merged rank-4 increments: the update outgrows the LoRA rank
    assert max(m["numerical_rank"] for m in result["modules"].values()) > 4
    png = (out / "rank_vs_depth.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "numerical rank" in printed and "q_proj" in printed
    assert len((out / "summary.txt").read_text().splitlines()) < 25


def test_safety(runs, tmp_path, capsys):
    run, _ = runs[2]
    work = tmp_path / "run"
    shutil.copytree(run, work, ignore=shutil.ignore_patterns("tensorboard"))
    ckpts = work / "checkpoints"
    # an interrupted later save is skipped; pointing at it is refused
    partial = ckpts / "step00000009"
    shutil.copytree(ckpts / "step00000006", partial)
    (partial / "COMPLETE").unlink()
    assert convert.main(["merged", str(partial), str(tmp_path / "x"), "--quiet"]) == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
    _convert("merged", work, tmp_path / "ok")
    assert json.loads((tmp_path / "ok" / "ds_scalora_export.json").read_text())["step"] == 6
    # an existing OUT is never overwritten without --overwrite
    assert convert.main(["merged", str(work), str(tmp_path / "ok"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    _convert("merged", work, tmp_path / "ok", "--overwrite")
    # a truncated file is named; nothing is left behind
    victim = next((ckpts / "step00000006").glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert convert.main(["merged", str(work), str(tmp_path / "bad"), "--quiet"]) == 2
    assert str(victim) in capsys.readouterr().err
    victim.unlink()
    assert convert.main(["merged", str(work), str(tmp_path / "bad"), "--quiet"]) == 2
    assert "optimizer files" in capsys.readouterr().err
    shard = ckpts / "step00000006" / "ds_scalora_rank00001_of00002.pt"
    shutil.copy(run / "checkpoints" / "step00000006" / victim.name, victim)
    shard.unlink()
    assert convert.main(["merged", str(work), str(tmp_path / "bad"), "--quiet"]) == 2
    assert "ds_scalora_rank00001_of00002.pt" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.tmp-*"))
    # a plain DeepSpeed directory with a 'latest' file
    plain = tmp_path / "plain"
    shutil.copytree(run / "checkpoints" / "step00000006", plain / "global_step6")
    (plain / "latest").write_text("global_step6")
    assert convert.main(["merged", str(plain), str(tmp_path / "p"), "--quiet", "--config", TINY]) == 0
    assert (tmp_path / "p" / "config.json").is_file()


def _eval_loss(model, sets, tokenizer):
    """The training loop's held-out loss (``loop.evaluate`` at any world size: the first max_batches x micro rows,
    token-weighted) computed with a plain HF model; returns (loss, held-out set)."""
    from ds_scalora.train.config import load_config
    from ds_scalora.train.data import collate
    from ds_scalora.train.loop import _datasets

    cfg = load_config(TINY, sets)
    _, held_out = _datasets(cfg, tokenizer, 0)
    micro = cfg.train.per_device_train_batch_size
    rows = list(range(len(held_out)))[: cfg.eval.max_batches * micro]
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(rows), micro):
            idx = rows[i : i + micro]
            batch = collate([held_out.input_ids[j] for j in idx], [held_out.labels[j] for j in idx], tokenizer.pad_token_id)
            n = float((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(model(**batch).loss) * n
            tokens += n
    return loss_sum / tokens, held_out


def test_zero0_checkpoint_exports_and_changes_world_size(tmp_path):
    """ZeRO-0 (fp32; everything in one replicated mp_rank_00_model_states.pt, optimizer included).

    ScaLoRA at 2 ranks, 5 steps (refreshes at 2 and 4), checkpoints at 3 and 5, trained at one rank's
    global batch so that the engine's held-out loss at step 5 (summary.json) is computed on the rows
    ``_eval_loss`` replays: the merged export of step 5 must give it within 1e-5 relative. The step-3
    checkpoint resharded to 1 rank resumes with the original losses of steps 4-5 (1e-5 relative,
    reduction order)."""
    from ds_scalora.train.model import byte_tokenizer

    run = tmp_path / "run"
    sets = ["deepspeed.zero_optimization.stage=0", "model.dtype=fp32", "train.max_steps=5", "train.eval_steps=5",
            "train.save_steps=3", "train.save_total_limit=3", "eval.exact_match=false", "eval.max_batches=2"]  # fmt: skip
    summary = train(2, run, *sets)
    assert summary["scalora_totals"]["refreshes"] == 2

    _convert("merged", run / "checkpoints" / "step00000005", tmp_path / "merged", "--dtype", "fp32")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    # the loop evaluates max_batches x micro rows in all at any world size: replay them at one rank
    loss, _ = _eval_loss(merged, sets, byte_tokenizer())
    engine_loss = summary["eval"]["eval_loss"]
    print(f"ZeRO-0: engine eval loss {engine_loss:.7f}, merged export {loss:.7f}")
    assert abs(loss - engine_loss) <= 1e-5 * abs(engine_loss)

    tag = tmp_path / "w1" / "checkpoints" / "step00000003"
    _convert("reshard", run / "checkpoints" / "step00000003", tag, "--world", 1)
    again = train(1, tmp_path / "w1", *sets, "train.gradient_accumulation_steps=4", f"train.resume_from_checkpoint={tag}")
    want = {h["step"]: h["loss"] for h in summary["history"] if h["step"] > 3}
    got = {h["step"]: h["loss"] for h in again["history"] if h["step"] > 3}
    assert sorted(got) == sorted(want) == [4, 5]
    assert all(abs(got[k] - want[k]) <= 1e-5 * abs(want[k]) for k in want), (got, want)


def test_gpt2_conv1d_layers_export_in_their_own_layout(tmp_path):
    """GPT-2 stores its projections as ``Conv1D`` (d_in x d_out), which PEFT adapts with fan_in_fan_out.

    A tiny random GPT-2 (saved to a local dir, the byte tokenizer beside it) trained with ScaLoRA at one
    rank, ZeRO-2 fp32, 5 steps with refreshes at 2 and 4 (c_proj is square, so a missing transpose
    would not even fail on shapes). Reference: the engine's own held-out loss at step 5, printed in
    summary.json by the training loop. The merged export must give the same loss on the same eval rows
    (1e-5 relative: fp32 forward in another order), and the full-rank PEFT export (stock PEFT applying
    ``(B A)ᵀ`` itself) the merged model's logits (1e-5 of max |logit|).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from ds_scalora.train.model import byte_tokenizer

    base = tmp_path / "gpt2"
    tok = byte_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(base)  # fmt: skip
    tok.save_pretrained(base)
    run = tmp_path / "run"
    sets = [f"model.model_name_or_path={base}", "model.random_init=null", "model.dtype=fp32",
            'method.target_modules=["c_attn","c_proj","c_fc"]', "train.max_steps=5", "train.eval_steps=5",
            "train.save_steps=5", "eval.exact_match=false"]  # fmt: skip
    summary = train(1, run, *sets)
    assert summary["scalora_totals"]["refreshes"] == 2

    _convert("merged", run, tmp_path / "merged", "--dtype", "fp32")
    _convert("peft", run, tmp_path / "peft", "--energy", "1.0")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    loss, held_out = _eval_loss(merged, sets, tok)
    engine_loss = summary["eval"]["eval_loss"]
    print(f"GPT-2 Conv1D: engine eval loss {engine_loss:.7f}, merged export {loss:.7f}")
    assert abs(loss - engine_loss) <= 1e-5 * abs(engine_loss)

    ids = torch.tensor([held_out.input_ids[0]])
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        plain = base_model(input_ids=ids).logits  # the base alone is far away: the update matters
        got = PeftModel.from_pretrained(base_model, tmp_path / "peft")(input_ids=ids).logits  # wraps base_model
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale
    assert float((plain - want).abs().max()) > 1e-3 * scale
