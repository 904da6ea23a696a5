#!/usr/bin/env bash
# The GPU checklist (../shared/gpu.md) in one command on a lent GPU machine, each phase under its own time
# limit inside one overall deadline, logs kept, a short table printed last:
#
#   bash tools/gpu_checklist.sh OUTDIR [SECONDS]      # SECONDS: the overall deadline (default 540)
#
# Needs in .whl/ (git-ignored; carried with run's carry=[".whl"]; ../shared/gpu.md says how to build them),
# the versions of .venv: deepspeed (built here), hjson, pydantic, pydantic-core, annotated-types,
# typing-inspection, typing_extensions (pydantic needs a newer one than the image may have), datasets, dill,
# multiprocess (ds_scalora/train/data.py), trl (data.packing), gguf (the packaged model). About 7 MB; the H200
# image has the rest. The real SmolLM2 weights (phases power-facts, distill-probe, demo-real) travel in two halves
# (tools/gpu_model_parts.sh split, here): call 1 with carry [".whl", ".assets/a"] and any phases that need no
# model, call 2 right after it (the machine stays warm 30 s) with carry [".whl", ".assets/b"]; a call that has
# not got both halves yet skips those phases.
# Measured on an H200 (docs/gpu_runs.md): equivalence ~35 s, a 1.1B cost run ~30 s; the first call also
# spends ~1 min starting the machine.
# ONLY="PHASE ..." runs a subset; for a dry run on a CPU: NO_WHEELS=1 DS_ACCELERATOR=cpu ONLY=demo-z2
# DEMO_SHAPE="{hidden_size: 64, ...}" DEMO_SETS="--set model.dtype=fp32 --set train.max_steps=12".
# All phases take ~15 minutes, more than one 10-minute call: pick with ONLY (e.g. ONLY="cost-12b refresh-12b").
# Phases, most valuable first (a phase that would outrun the deadline is cut short, the rest skipped):
#   equivalence  tests/distributed/cuda_equivalence.py: ScaLoRA at ZeRO-0..3 on one CUDA rank (NCCL)
#                against the single-process reference, resume bit-identical, the Adam-aware solver
#   cost-12b     tools/benchmark.py cost --preset gpu --tasks 12b: LoRA, ScaLoRA-I, ScaLoRA side by side
#   cost-1b      the same at the 1.1B shape (cost-report: both in one report)
#   refresh-1b, refresh-12b   tools/benchmark.py refresh --device cuda: the refresh's roofline on the GPU
#   demo-z3      the demo config through the deepspeed launcher in bf16 at ZeRO-3, at SmolLM2-135M's
#                shape with random weights (the real weights are a 98 MB (94 MiB) file: more than a device
#                call carries), to the end: eval, generation, checkpoint, merged export
#   demo-z2      the demo config as demo-z3, at ZeRO-2
#   power-facts  issue 16's task (c) on the GPU, POWER_WORKERS (default 12) runs at a time: POWER_FIRST's arms (the targets'),
#                then every arm's tuning,
#                then its report seeds (docs/bench_records_cuda/, resumable), records tarred into OUTDIR
#                (here: tar xzf bench_records_cuda.tar.gz -C docs; python tools/benchmark.py power --device cuda --report-only)
#   distill-probe  the resized task (b)'s question first (issue 16): does full fine-tuning learn a ΔW* on
#                o_proj and down_proj below the rank-4 floor in 1000 steps? LoRA r=4 beside it, one seed
#   demo-real    the demo exactly as the README runs it (real weights, fp32, ZeRO-2): its exact-match claim
set -u
OUTDIR=${1:?usage: tools/gpu_checklist.sh OUTDIR [SECONDS]}
DEADLINE=$(( $(date +%s) + ${2:-540} ))
mkdir -p "$OUTDIR/logs"
LOGS=$OUTDIR/logs
SUMMARY=$OUTDIR/summary.txt
: > "$SUMMARY"

if [[ -z ${NO_WHEELS:-} ]]; then  # NO_WHEELS=1: a dry run in an environment that has them (e.g. .venv)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$LOGS/pip.log" 2>&1 || { echo "wheel install failed (logs/pip.log)" | tee -a "$SUMMARY"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export CUBLAS_WORKSPACE_CONFIG=:4096:8
# the model's halves this call carried are kept for the next call; once both are here it is joined
bash tools/gpu_model_parts.sh stash > "$LOGS/model.log" 2>&1
bash tools/gpu_model_parts.sh join /tmp/site >> "$LOGS/model.log" 2>&1
MODEL=$(python3 -c "from ds_scalora.bench.distill import MODEL; print(MODEL)")  # its owner: the tasks' model
has_model() { python3 -c "from ds_scalora.train.packaged_models import locate; locate('$MODEL')" 2>/dev/null; }
if has_model; then  # converted once before any phase uses it (parallel runs would each convert it)
  python3 -c "from ds_scalora.train.packaged_models import materialize; print('model:', materialize('$MODEL'))" >> "$LOGS/model.log" 2>&1
fi
tail -n 2 "$LOGS/model.log" | tee -a "$SUMMARY"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, deepspeed, transformers, peft, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__)"
} > "$LOGS/env.log" 2>&1
cat "$LOGS/env.log" | tee -a "$SUMMARY"

# DEMO_SHAPE / DEMO_SETS: a smaller shape and extra --set flags for a dry run of this script on a CPU
SMOLLM2_SHAPE=${DEMO_SHAPE:-"{hidden_size: 576, intermediate_size: 1536, num_hidden_layers: 30, num_attention_heads: 9, num_key_value_heads: 3, max_position_embeddings: 2048, tie_word_embeddings: true}"}

phase() {  # phase NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2; shift 2
  if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="phase ...": a subset
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 20 )); then echo "$name: skipped (deadline)" | tee -a "$SUMMARY"; return; fi
  (( cap > left )) && cap=$left
  local t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  pkill -f ds_scalora.bench.cost_worker; pkill -f launch/train.py; pkill -f spawn_main; sleep 1  # what a cut-short phase left
  echo "$name: rc $rc in $(( $(date +%s) - t0 )) s (limit $cap s)" | tee -a "$SUMMARY"
  tail -n 4 "$LOGS/$name.log" | sed "s/^/  /" >> "$SUMMARY"
}

demo() {  # demo STAGE [--set KEY=VALUE ...]
  local stage=$1; shift
  deepspeed --num_gpus 1 launch/train.py --config ds_configs/demo.yaml --set model.model_name_or_path=null \
    --set "model.random_init=$SMOLLM2_SHAPE" --set model.dtype=bf16 --set deepspeed.zero_optimization.stage=$stage \
    --set train.output_dir=/tmp/demo_z$stage ${DEMO_SETS:-} "$@" && python3 -c "
import json; s = json.load(open('/tmp/demo_z$stage/summary.json'))
print('summary:', json.dumps({k: s[k] for k in s if k in ('steps', 'final_loss', 'eval_before_training', 'eval', 'scalora_totals', 'scalora_energy_outside_top_r', 'final_model')})[:1500])"
}

phase equivalence 120 python3 tests/distributed/cuda_equivalence.py
phase cost-12b 220 python3 tools/benchmark.py cost --preset gpu --tasks 12b --work /tmp/bench_gpu --out "$OUTDIR"
phase cost-1b 120 python3 tools/benchmark.py cost --preset gpu --tasks 1b --work /tmp/bench_gpu --out "$OUTDIR"
# both shapes in one report, from the runs cached above (a shape that did not finish would start again: cut short)
phase cost-report 40 python3 tools/benchmark.py cost --preset gpu --tasks 12b 1b --work /tmp/bench_gpu --out "$OUTDIR"
# issue 21's roofline of the refresh on CUDA, phase by phase, beside a LoRA step and ScaLoRA's side-by-side ratios
phase refresh-1b 150 python3 tools/benchmark.py refresh --device cuda --shape 1b --ranks 16 --repeats 3 --rounds 5 --out "$OUTDIR/benchmarks_refresh_1b_gpu.md"
phase refresh-12b 200 python3 tools/benchmark.py refresh --device cuda --shape 12b --repeats 2 --rounds 3 --out "$OUTDIR/benchmarks_refresh_12b_gpu.md"
export -f demo; export SMOLLM2_SHAPE
# 20 steps: the refreshes at steps 10 and 20 (ZeRO-3 at this shape ran ~1.2 s a step on an H200)
phase demo-z3 120 bash -c "demo 3 --set train.max_steps=20"
phase demo-z2 90 bash -c "demo 2"
model_phase() {  # model_phase NAME CAP COMMAND...: a phase that needs the real weights
  if [[ -n ${ONLY:-} && " $ONLY " != *" $1 "* ]]; then return; fi
  if ! has_model; then echo "$1: skipped (no model yet: carry .assets/a, then .assets/b)" | tee -a "$SUMMARY"; return; fi
  phase "$@"
}
probe() {  # probe METHOD LR SUBSPACE: one task-(b) run on o_proj and down_proj of layers 6 and 18, 1000 steps
  python3 -m ds_scalora.bench.distill --probe "$1" --lr "$2" --subspace "$3" --steps ${PROBE_STEPS:-1000} --schedule cosine \
    --targets model.layers.6.self_attn.o_proj model.layers.18.self_attn.o_proj model.layers.6.mlp.down_proj model.layers.18.mlp.down_proj
}
probes() { probe full 3e-4 32 & probe full 1e-3 32 & probe full 1e-3 128 & probe lora 3e-3 32 & wait; }
# task (c): the targets' arms first (POWER_FIRST: tuning, then report seeds), then every other arm; resumable, a
# cut-short phase keeps the runs it finished. (The distill probes ran beside it once, 2026-12-04: both starved.)
power_facts() {
  python3 tools/benchmark.py power --tasks facts128 --workers "${POWER_WORKERS:-12}" --device cuda --arms ${POWER_FIRST:-lora full scalora-I scalora}
  python3 tools/benchmark.py power --tasks facts128 --workers "${POWER_WORKERS:-12}" --device cuda
}
export -f probe probes power_facts
model_phase power-facts ${POWER_CAP:-420} bash -c power_facts
[[ -d docs/bench_records_cuda ]] && tar czf "$OUTDIR/bench_records_cuda.tar.gz" -C docs bench_records_cuda
model_phase distill-probe 240 bash -c probes
model_phase demo-real 150 deepspeed --num_gpus 1 launch/train.py --config ds_configs/demo.yaml --set train.output_dir=/tmp/demo_real
cp /tmp/bench_gpu/*.json /tmp/bench_gpu/*.log "$LOGS/" 2>/dev/null
(cd "$OUTDIR" && tar czf logs.tar.gz logs && rm -r logs)
echo; cat "$SUMMARY"
