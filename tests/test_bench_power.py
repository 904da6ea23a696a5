"""The powered benchmark's harness on task (a), shrunk: records, resume, tuning choice, statistics, report."""

import json
import os

import numpy as np
import pytest
import scipy.stats

from ds_scalora.bench import power, regression
from ds_scalora.bench.stats import gap_closed, paired_difference


def _small_task():
    arms = [power.Arm("lora", {"method": "lora", "r": 4}, lrs=[1e-3, 1e-2]),
            power.Arm("full", {"method": "full"}, lrs=[1e-3]),
            power.Arm("scalora-I", {"method": "scalora", "r": 4, "interval": 10}, lrs=[1e-3, 1e-2],
                      shrinks=[1.0, 4.0]),
            power.Arm("scalora-I-constant", {"method": "scalora", "r": 4, "interval": 10, "ablation": "constant_shrink"},
                      lrs=[1e-2])]
    task = power.Task("regression", "shrunk", arms, tune_seeds=[100], report_seeds=[0, 1, 2], floor=regression.lora_floor(4))
    calls = []

    def run(spec, lr, seed):
        calls.append((json.dumps(spec, sort_keys=True), lr, seed))
        return regression.run(spec, lr, seed, steps=60)

    task.run = run
    return task, calls


def test_sweep_records_resume_and_report(tmp_path):
    task, calls = _small_task()
    power.sweep(task, root=str(tmp_path), log=lambda *_: None)
    # tuning: 2 + 1 + 2x2 + 1 points on one seed; report: 4 arms x 3 seeds
    assert len(calls) == 8 + 12
    assert [seed for _, _, seed in calls[8:]] == [0] * 4 + [1] * 4 + [2] * 4  # report runs seed by seed: whole pairs
    lines = (tmp_path / "regression" / "scalora-I.jsonl").read_text().splitlines()
    assert len(lines) == 4 + 3 and all(json.loads(line)["phase"] in ("tune", "report") for line in lines)
    # a second sweep finds every record and runs nothing (an interrupted sweep resumes)
    power.sweep(task, root=str(tmp_path), log=lambda *_: None)
    assert len(calls) == 20
    # the tuned setting is the grid point with the lowest mean over the tuning seeds, edges flagged
    spec, lr, table, edges = power.tuned_setting(task, task.arms[2], root=str(tmp_path))
    assert table[(spec["shrink"], lr)] == min(table.values())
    assert "shrink" in edges and "lr" in edges  # a 2-point grid: every point is an edge
    text, figures = power.render(task, root=str(tmp_path))
    assert "| scalora-I |" in text and "gap closed" in text
    assert figures["scalora-I"]["diff"]["n"] == 3
    # an ablation is compared with the default it varies too, seed by seed from the records
    def report_metric(arm):
        rows = [json.loads(x) for x in (tmp_path / "regression" / f"{arm}.jsonl").read_text().splitlines()]
        return {r["seed"]: r["error"] for r in rows if r["phase"] == "report"}
    ref, ablation = report_metric("scalora-I"), report_metric("scalora-I-constant")
    by_hand = np.mean([ref[s] - ablation[s] for s in (0, 1, 2)])
    assert figures["scalora-I-constant"]["vs_scalora_I"]["mean"] == pytest.approx(by_hand, rel=1e-12)
    assert "| scalora-I-constant | " in text.split("Against ScaLoRA-I")[1]
    t = power.run_time(task, root=str(tmp_path))
    assert t["runs"] == 20 and t["missing"] == 0 and t["hours"] > 0
    with open(tmp_path / "regression" / "lora.jsonl") as f:  # the first tuning record lost: it and LoRA's 3 report
        kept = f.read().splitlines()[1:]                     # runs (tuning incomplete, no setting) are missing
    (tmp_path / "regression" / "lora.jsonl").write_text("\n".join(kept) + "\n")
    assert power.run_time(task, root=str(tmp_path))["missing"] == 1 + 3


def test_records_of_an_earlier_task_version_stay_in_the_files_unused(tmp_path):
    """A change that alters a task's runs (facts128's warm-up) adds a field to ``Task.current``: the older
    records are kept but no longer count, so a sweep re-runs them and no comparison mixes the two."""
    task, calls = _small_task()
    task.arms = task.arms[:2]  # lora, full: 3 tuning + 6 report runs
    plain = task.run
    task.run = lambda spec, lr, seed: {**plain(spec, lr, seed), **task.current}
    power.sweep(task, root=str(tmp_path), log=lambda *_: None)
    assert len(calls) == 9 and power.superseded(task, root=str(tmp_path)) == 0
    old = power.report_values(task, task.arms[0], root=str(tmp_path))
    task.current = {"schedule": "new"}
    assert power.load_records(task, "lora", root=str(tmp_path)) == {}
    assert power.run_time(task, root=str(tmp_path))["missing"] == 9  # every run again: tuning incomplete
    power.sweep(task, root=str(tmp_path), log=lambda *_: None)
    assert len(calls) == 18  # the same 9 points, run again
    assert power.superseded(task, root=str(tmp_path)) == 9  # the old lines are still in the files
    assert len((tmp_path / "regression" / "lora.jsonl").read_text().splitlines()) == 2 * (2 + 3)
    recs = power.load_records(task, "lora", root=str(tmp_path))
    assert len(recs) == 5 and all(r["schedule"] == "new" for r in recs.values())
    new = power.report_values(task, task.arms[0], root=str(tmp_path))
    assert all(r["schedule"] == "new" for r in new[1].values()) and old[1].keys() == new[1].keys()
    text = power.write_report([task], str(tmp_path / "report.md"), root=str(tmp_path))
    assert "9 records of an earlier version of the task" in text


def test_paired_statistics_against_scipy_and_by_hand():
    """The t-interval and the exact Wilcoxon p from their definitions; the gap share on the means."""
    rng = np.random.default_rng(0)
    lora = rng.normal(1.0, 0.1, 8)
    arm = lora - rng.normal(0.2, 0.05, 8)
    d = paired_difference(list(lora), list(arm))
    diff = lora - arm
    half = scipy.stats.t.ppf(0.975, 7) * diff.std(ddof=1) / np.sqrt(8)
    assert d["low"] == pytest.approx(diff.mean() - half) and d["high"] == pytest.approx(diff.mean() + half)
    assert d["p_wilcoxon"] == pytest.approx(2 / 2**8)  # all 8 differences positive: the exact two-sided p
    g = gap_closed(list(lora), list(arm), [0.0] * 8)
    assert g["share"] == pytest.approx((lora.mean() - arm.mean()) / lora.mean())
    assert g["low"] <= g["share"] <= g["high"]


def test_distillation_task_knows_its_answer(tmp_path, monkeypatch):
    """Task (b)'s known update, checked in float64 against its definition: ΔW* Σ^½ has singular values
    ∝ i^-½ on SUBSPACE directions (exact SVD; the rank-4 floor the report quotes is their energy past
    the fourth) and E‖ΔW* x‖² is RELATIVE_ENERGY of E‖W x‖², for an anisotropic Σ like the text's.
    Before any step the student is the base model: weight error exactly 1, held-out KL positive."""
    import torch

    from ds_scalora.bench import distill
    from ds_scalora.spectrum import energy_outside_top

    monkeypatch.setenv("DS_SCALORA_CACHE", str(tmp_path))  # the teacher's cache stays out of the home folder
    g = torch.Generator().manual_seed(0)
    W = torch.randn(576, 576, generator=g, dtype=torch.float64)
    X = torch.randn(4096, 576, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 576, dtype=torch.float64)
    sigma = X.T @ X / 4096  # eigenvalues spread over six decades
    D = distill.true_update(W, sigma, seed=3, index=1)
    ev, V = torch.linalg.eigh(sigma)
    half = V @ torch.diag(ev.sqrt()) @ V.T
    s = torch.linalg.svdvals(D @ half)
    m = distill.SUBSPACE
    assert torch.allclose(s[:m] / s[0], torch.arange(1, m + 1, dtype=torch.float64) ** -0.5, rtol=1e-8)
    assert float(s[m] / s[0]) < 1e-8  # nothing outside the subspace
    assert energy_outside_top(D @ half, 4) == pytest.approx(distill.lora_floor(4), rel=1e-8)
    assert float((D @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum()) == pytest.approx(distill.RELATIVE_ENERGY, rel=1e-8)
    result = distill.run({"method": "lora", "r": 4}, 1e-3, seed=3, steps=0)
    assert result["weight_error"] == pytest.approx(1.0, abs=1e-6)
    assert result["weight_error_per_target"] == pytest.approx([1.0] * len(distill.TARGETS), abs=1e-4)
    assert result["kl"] > 0


def test_distillation_from_a_late_layer_is_the_whole_model(tmp_path, monkeypatch):
    """``start_layer``: a student whose lower layers pass through (PassThrough), fed the inputs of its first
    computed layer that the teacher's pass cached, has the full model's logits and the same gradient for an
    upper weight (float64, a tiny Llama: the computed layers run the same operations on the same inputs, so
    only rounding may differ, far below 1e-12; the teacher's own update sits at or above that layer, as the
    task requires). A target below ``start_layer`` is refused."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_scalora.bench import distill

    monkeypatch.setenv("DS_SCALORA_CACHE", str(tmp_path))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1)
    teacher = LlamaForCausalLM(config).double().eval()
    student = LlamaForCausalLM(config).double()
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        teacher.model.layers[2].mlp.down_proj.weight.add_(0.1)  # the known update, above start_layer
    batches = [torch.randint(0, 64, (2, 7)) for _ in range(2)]
    states = distill.teacher_states(teacher, batches, start_layer=2)
    assert len(states) == 4
    for b, h in zip(batches, states[:2]):
        assert torch.equal(teacher.lm_head(h), teacher(input_ids=b).logits.detach())
    target = "model.layers.2.mlp.down_proj"
    assert distill.layer_index(target) == 2 and distill.layer_index("lm_head") is None
    grads = []
    for start in (None, 2):
        model = LlamaForCausalLM(config).double()
        model.load_state_dict(student.state_dict())
        if start is not None:
            for i in range(start):
                model.model.layers[i] = distill.PassThrough()
        logits = []
        model.zero_grad()
        for b, h in zip(batches, states[2:]):
            out = model(input_ids=b) if start is None else model(inputs_embeds=h)
            out.logits.pow(2).mean().backward()
            logits.append(out.logits.detach())
        grads.append((torch.cat(logits), model.model.layers[2].mlp.down_proj.weight.grad.clone()))
    (full_logits, full_grad), (late_logits, late_grad) = grads
    assert torch.allclose(late_logits, full_logits, rtol=1e-12, atol=1e-12)
    assert torch.allclose(late_grad, full_grad, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="start_layer=25.*not in a decoder layer at or above it"):
        distill.run({"method": "lora"}, 1e-3, seed=0, steps=0, targets=["model.layers.24.mlp.down_proj"], start_layer=25)


def test_distillation_teacher_cache_hits_misses_and_recovers(tmp_path, monkeypatch):
    """The cached teacher states give the teacher's own logits through ``lm_head``; the same teacher on
    the same batches is read back without computing, any changed weight or token misses, and a corrupt
    file is recomputed and replaced."""
    import os

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_scalora.bench import distill

    monkeypatch.setenv("DS_SCALORA_CACHE", str(tmp_path))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(config).eval()
    batches = [torch.randint(0, 64, (2, 5)) for _ in range(3)]
    states = distill.teacher_states(teacher, batches)
    with torch.no_grad():
        for b, h in zip(batches, states):
            assert torch.equal(teacher.lm_head(h), teacher(input_ids=b).logits)

    calls = []

    def compute():
        calls.append(1)
        return [torch.zeros(1)]

    key = distill.fingerprint(*teacher.state_dict().values(), *batches)
    assert torch.equal(distill.cached("teacher", key, compute)[1], states[1])  # a hit: nothing computed
    assert calls == []
    changed = [batches[0], batches[1].clone(), batches[2]]
    changed[1][0, 0] = (changed[1][0, 0] + 1) % 64
    assert distill.fingerprint(*teacher.state_dict().values(), *changed) != key
    with torch.no_grad():
        teacher.model.norm.weight[0] += 1e-3
    assert distill.fingerprint(*teacher.state_dict().values(), *batches) != key
    assert distill.fingerprint(torch.zeros(2, 3)) != distill.fingerprint(torch.zeros(3, 2))  # shape counts

    (path,) = [os.path.join(tmp_path, "distill", f) for f in os.listdir(tmp_path / "distill")]
    with open(path, "wb") as f:
        f.write(b"not a torch file")
    assert torch.equal(distill.cached("teacher", key, compute)[0], torch.zeros(1))  # recomputed
    assert calls == [1]
    assert torch.equal(torch.load(path, weights_only=True)[0], torch.zeros(1))  # and replaced
    assert not [f for f in os.listdir(tmp_path / "distill") if f.endswith(".tmp")]


def test_steps_to_reach_counts_from_the_curves_first_step_and_its_rounding():
    """A curve with a point at step 0 (facts128's) is counted from 0; a run reaches its own final value,
    which is stored to 6 decimals while the curve is rounded to 5."""
    from ds_scalora.bench.power import steps_to_reach

    curve = [5.5, 2.0, 0.70754]  # steps 0, 10, 20
    assert steps_to_reach(curve, 0.707538, every=10, start=0) == 20
    assert steps_to_reach(curve, 2.0, every=10, start=0) == 10
    assert steps_to_reach(curve, 0.5, every=10, start=0) is None
    assert steps_to_reach([0.9, 0.4], 0.5, every=20) == 40  # no start point: the first is at step `every`


def _two_arm_task():
    arms = [power.Arm("lora", {"method": "lora", "r": 4}, lrs=[1e-2]),
            power.Arm("scalora-I", {"method": "scalora", "r": 4, "interval": 10}, lrs=[1e-2])]
    return power.Task("regression", "shrunk", arms, tune_seeds=[100], report_seeds=[0],
                      floor=regression.lora_floor(4))  # Task.run itself: picklable, for the worker processes


def test_parallel_workers_record_what_one_process_records(tmp_path, monkeypatch):
    """``--workers``: every run a fresh process, this one the only writer. The records must be those of the
    sequential sweep, bit for bit (both at one CPU thread a run, so the arithmetic is the same), and a
    second parallel sweep runs nothing. Two runs only: each worker process pays ~5-10 s of imports."""
    import torch

    task, threads = _two_arm_task(), torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # each of 2 workers gets one thread on any machine
    torch.set_num_threads(1)  # and so does the sequential sweep
    try:
        power.sweep(task, root=str(tmp_path / "one"), phases=("tune",), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    logs = []
    assert power.sweep(task, root=str(tmp_path / "two"), phases=("tune",), log=logs.append, workers=2, device="cpu") == 0
    assert len(logs) == 2
    for arm in ("lora", "scalora-I"):
        one, two = (power.load_records(task, arm, str(tmp_path / d)) for d in ("one", "two"))
        assert one.keys() == two.keys() and len(one) == 1
        for key in one:
            assert one[key]["error"] == two[key]["error"] and one[key]["curve"] == two[key]["curve"]
    assert power.sweep(task, root=str(tmp_path / "two"), phases=("tune",), log=logs.append, workers=2, device="cpu") == 0
    assert len(logs) == 2


def test_records_of_another_device_are_refused(tmp_path):
    """The GPU's runs go to a folder of their own: a sweep on CUDA into the CPU's records is refused with the
    folder to use, before any run, and the file is left as it was."""
    task = _two_arm_task()
    path = tmp_path / "regression" / "lora.jsonl"
    path.parent.mkdir()
    line = json.dumps({"phase": "tune", "spec": {"method": "lora", "r": 4}, "lr": 1e-2, "seed": 100, "error": 0.5,
                       "curve": [], "seconds": 1.0}) + "\n"  # a CPU record of before 2026-12-04: no device field
    path.write_text(line)
    with pytest.raises(ValueError, match="bench_records_cuda"):
        power.sweep(task, root=str(tmp_path), log=lambda *_: None, device="cuda")
    assert path.read_text() == line
    assert power.records_root("cuda").endswith("bench_records_cuda") and power.records_root("cpu") == power.RECORDS


def test_report_of_one_task_keeps_every_task_with_records(tmp_path):
    """A sweep of one task rewrites the device's shared report: the other tasks with records stay in it (a
    facts128-only sweep once cut the CPU report down to facts128), and a task without records is left out."""
    from ds_scalora.bench.power.cli import main

    for task in ("regression", "facts128"):
        (tmp_path / task).mkdir()
        (tmp_path / task / "lora.jsonl").write_text("")
    out = tmp_path / "report.md"
    main(["--tasks", "regression", "--report-only", "--device", "cpu", "--records", str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert "## regression" in text and "## facts128" in text and "## distill" not in text
    assert "--tasks regression facts128" in text  # the header's command regenerates this same report


def test_detectable_difference_has_its_power_by_simulation():
    """The smallest difference the paired t-test detects with 80% power, against a simulation of that test
    (independent of the noncentral-t formula): at n = 8 and the computed effect, the two-sided 5% t-test
    rejects in 80% of 20,000 simulated experiments (binomial sd 0.0028: tolerance 0.012, over 4 sd), and at
    large n the effect tends to the normal approximation (1.960 + 0.842)·sd/√n."""
    from ds_scalora.bench.stats import detectable_difference

    sd, n = 0.33, 8
    effect = detectable_difference(sd, n)
    rng = np.random.default_rng(0)
    d = rng.normal(effect, sd, size=(20_000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / np.sqrt(n))
    rejected = np.mean(np.abs(t) > scipy.stats.t.ppf(0.975, n - 1))
    assert abs(rejected - 0.8) < 0.012, rejected
    big = detectable_difference(1.0, 10_000) * np.sqrt(10_000)
    assert abs(big - (scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8))) < 0.01
    assert detectable_difference(sd, 16) < effect  # more seeds detect less
