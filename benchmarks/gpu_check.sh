#!/usr/bin/env bash
# GPU acceptance check: one command on a machine with an NVIDIA GPU, under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [RESULTS.md]      (default: benchmarks/results/gpu_check.md)
#
# Prints (and writes) a table with one row per check and exits 1 if any check failed:
#   doctor        `dtrain doctor` passes
#   collectives   the NCCL paths at world size 1: DDP forced on, all_reduce, objects, barrier,
#                 the stop vote (async all-reduce read through pinned memory), pinned checkpoint copy
#   bf16 / fp16   charlm tiny converges (warmup + clipping; fp16 adds the GradScaler)
#   resume        digits through `dtrain launch` (NCCL): a checkpoint, SIGTERM (exit 143), a rerun
#                 that resumes and ends bit-identical to an uninterrupted run
#   cpu load      final_model.pt loads with weights_only=True where no GPU is visible
#   exact eval    the eval loss in summary.json equals the loss recomputed on CPU from final_model.pt
#   gpt2 eager / gpt2 compile
#                 GPT-2 small (lm task, ddp and fsdp) in bf16: tokens/s, MFU, and the checkpoint stall
# GPU_CHECK_DRY=1 runs the same checks small on CPU (gloo, bf16 only, tiny model, no compile),
# to test the script itself. PEAK_TFLOPS=... gives MFU on a GPU the peak table lacks.
set -uo pipefail

cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results/gpu_check.md}
mkdir -p "$(dirname "$RESULTS")"
WORK=$(mktemp -d -t dtrain-gpu-check-XXXX)
export WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS: the resume check compares bits
PY=${PYTHON:-python3}
DTRAIN=("$PY" -m distributed_train)
COMMON=(--log.wandb=disabled)
[ -n "${PEAK_TFLOPS:-}" ] && COMMON+=("--log.peak_tflops=$PEAK_TFLOPS")

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  BACKEND=gloo; PRECISIONS="bf16"; GPT=(--task_args.preset=tiny --task_args.seq_len=64 --train.batch_size=8); GPT_STEPS=12
  COMPILE_MODES="false"; SMALL_STEPS=40; LOG_EVERY=4; RESUME_STEPS=60
else
  BACKEND=nccl; PRECISIONS="bf16 fp16"; GPT=(--task_args.preset=gpt2-small --train.batch_size=32); GPT_STEPS=60
  COMPILE_MODES="false true"; SMALL_STEPS=150; LOG_EVERY=10; RESUME_STEPS=400
fi

FAILED=0
row() { echo "| $1 | $2 | $3 |" | tee -a "$RESULTS"; }
pass() { row "$1" PASS "$2"; }
fail() { row "$1" "**FAIL**" "$2 (log: $3)"; FAILED=1; }
last_line() { tail -n "${2:-1}" "$1" | tr '\n|' ' /' | cut -c1-160; }

{
  echo "## GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | sed 's/^/GPU: /' || echo "GPU: none (nvidia-smi not found)"
  "$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL", torch.cuda.nccl.version() if torch.cuda.is_available() else "-")'
  [ "${GPU_CHECK_DRY:-0}" = 1 ] && echo "DRY RUN on CPU (GPU_CHECK_DRY=1): tests the script, not a GPU"
  echo
  echo "| check | result | detail |"
  echo "| --- | --- | --- |"
} | tee "$RESULTS"

# -- doctor ------------------------------------------------------------------------------------
if "${DTRAIN[@]}" doctor > "$WORK/doctor.log" 2>&1; then pass doctor "$(last_line "$WORK/doctor.log")"
else fail doctor "$(last_line "$WORK/doctor.log")" "$WORK/doctor.log"; fi

# -- collectives at world size 1 ----------------------------------------------------------------
if "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/gpu_collectives.py \
    --backend "$BACKEND" > "$WORK/collectives.log" 2>&1; then
  pass collectives "$(grep -c '^ok:' "$WORK/collectives.log") checks on $BACKEND"
else fail collectives "$(grep -m1 -e FAILED -e Error "$WORK/collectives.log")" "$WORK/collectives.log"; fi

# Reads a run's summary.json / metrics.jsonl: one detail line; exit 1 unless the loss fell.
run_detail() {
  "$PY" - "$1" <<'EOF'
import json, math, statistics, sys
run = sys.argv[1]
summary = json.load(open(f"{run}/summary.json"))
events = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
train = [e for e in events if e.get("kind") == "train"]
first, last = train[0]["loss"], summary["train_loss"]
steady = train[1:] or train  # the first window holds warm-up and compilation
parts = [f"loss {first:.3f} -> {last:.3f}"]
for key, fmt in (("tokens_per_s", "{:,.0f} tokens/s"), ("samples_per_s", "{:,.1f} samples/s"), ("mfu", "MFU {:.1%}")):
    values = [e[key] for e in steady if isinstance(e.get(key), (int, float))]
    if values:
        parts.append(fmt.format(statistics.median(values)))
stalls = [e["stall_s"] for e in events if e.get("kind") == "checkpoint"]
if stalls:
    parts.append(f"checkpoint stall {statistics.median(stalls):.2f} s (median of {len(stalls)})")
print(", ".join(parts))
sys.exit(0 if math.isfinite(last) and last < first else 1)
EOF
}

# -- mixed precision converges ----------------------------------------------------------------------
for precision in $PRECISIONS; do
  dir="$WORK/$precision"
  if "${DTRAIN[@]}" train --task=charlm --train.precision="$precision" --train.batch_size=64 \
      --train.max_steps=$SMALL_STEPS --train.warmup_steps=20 --train.grad_clip=1.0 --train.lr=2e-3 \
      --log.every_steps=$LOG_EVERY --run_dir="$dir" "${COMMON[@]}" > "$dir.log" 2>&1 \
      && detail=$(run_detail "$dir"); then pass "$precision" "charlm tiny: $detail"
  else fail "$precision" "charlm tiny: ${detail:-$(last_line "$dir.log")}" "$dir.log"; fi
  detail=""
done

# -- checkpoint, SIGTERM, resume bit-identical (NCCL through dtrain launch) --------------------------
RESUME_ARGS=(launch --nproc-per-node 1 --task=digits --dist.backend=$BACKEND --train.max_steps=$RESUME_STEPS
             --checkpoint.every_steps=20 --log.every_steps=20 "${COMMON[@]}")
resume_check() {
  "${DTRAIN[@]}" "${RESUME_ARGS[@]}" --run_dir="$WORK/reference" > "$WORK/reference.log" 2>&1 || return 1
  "${DTRAIN[@]}" "${RESUME_ARGS[@]}" --run_dir="$WORK/stopped" > "$WORK/stopped.log" 2>&1 &
  local pid=$! waited=0
  until ls "$WORK"/stopped/checkpoints/step-*/COMMITTED > /dev/null 2>&1; do
    sleep 0.2; waited=$((waited + 1))
    if [ $waited -gt 600 ] || ! kill -0 $pid 2> /dev/null; then echo "no checkpoint before the end"; return 1; fi
  done
  kill -TERM $pid; wait $pid; local code=$?
  [ $code = 143 ] || { echo "SIGTERM gave exit $code, not 143"; return 1; }
  "${DTRAIN[@]}" "${RESUME_ARGS[@]}" --run_dir="$WORK/stopped" > "$WORK/resumed.log" 2>&1 || return 1
  "$PY" - "$WORK" <<'EOF'
import json, sys, torch
work = sys.argv[1]
a = torch.load(f"{work}/reference/final_model.pt", weights_only=True)
b = torch.load(f"{work}/stopped/final_model.pt", weights_only=True)
resumed = json.load(open(f"{work}/stopped/summary.json"))["resumed_from"]
differ = [k for k in a if not torch.equal(a[k], b[k])]
print(f"stopped at {resumed.rsplit('/', 1)[-1]}, exit 143; resumed: " +
      ("bit-identical to the uninterrupted run" if not differ else f"{len(differ)} tensors differ"))
sys.exit(1 if differ or not resumed else 0)
EOF
}
if detail=$(resume_check 2>&1); then pass resume "$detail"
else fail resume "$(echo "$detail" | tail -1)" "$WORK/stopped.log"; fi

# -- final_model.pt on a machine without a GPU, and exact evaluation --------------------------------
if detail=$(CUDA_VISIBLE_DEVICES="" "$PY" - "$WORK/reference" 2>&1 <<'EOF'
import json, sys, torch
run = sys.argv[1]
state = torch.load(f"{run}/final_model.pt", weights_only=True)  # no map_location: must be CPU already
assert all(t.device.type == "cpu" for t in state.values()), "tensors not on the CPU"
print(f"{len(state)} tensors, all CPU, loaded with weights_only=True and no GPU visible")
EOF
); then pass "cpu load" "$detail"; else fail "cpu load" "$(echo "$detail" | tail -1)" "$WORK/reference"; fi

if detail=$("$PY" - "$WORK/reference" 2>&1 <<'EOF'
import json, sys, torch
from distributed_train.cli.train import resolve_config
from distributed_train.task import load_task
run = sys.argv[1]
config = resolve_config(f"{run}/config.yaml", [])
task = load_task(config.task, config)
model = task.model()
model.load_state_dict(torch.load(f"{run}/final_model.pt", weights_only=True))
model.eval()
data = task.eval_dataset()
total = 0.0
with torch.no_grad():
    for i in range(0, len(data), 256):
        batch = torch.utils.data.default_collate([data[j] for j in range(i, min(i + 256, len(data)))])
        total += task.loss(model, batch).double().item() * len(batch[0])
cpu_loss = total / len(data)
logged = json.load(open(f"{run}/summary.json"))["eval"]["loss"]
print(f"eval loss {logged:.6f} (run) vs {cpu_loss:.6f} (CPU, every sample once)")
sys.exit(0 if abs(cpu_loss - logged) <= 1e-4 * max(1.0, abs(cpu_loss)) else 1)
EOF
); then pass "exact eval" "$detail"; else fail "exact eval" "$(echo "$detail" | tail -1)" "$WORK/reference"; fi

# -- GPT-2 small (lm task over a memory-mapped token file, GPT-2's vocabulary) in bf16: ddp eager
# and compiled, and fsdp at world size 1: throughput, MFU and the checkpoint stall ----------------
TOKENS=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from workloads import ensure_lm_tokens; print(ensure_lm_tokens())')
for variant in $(for c in $COMPILE_MODES; do echo "ddp-$c"; done) fsdp-false; do
  engine=${variant%-*}; compile=${variant#*-}; dir="$WORK/gpt-$variant"
  if "${DTRAIN[@]}" train --task=lm "${GPT[@]}" --task_args.train="$TOKENS" --task_args.dtype=uint16 \
      --task_args.vocab_size=50257 --eval.max_samples=256 --engine="$engine" --train.precision=bf16 \
      --train.compile=$compile --train.max_steps=$GPT_STEPS --train.warmup_steps=10 --train.grad_clip=1.0 \
      --train.lr=6e-4 --log.every_steps=$LOG_EVERY --checkpoint.every_steps=20 --eval.batch_size=64 \
      --run_dir="$dir" "${COMMON[@]}" > "$dir.log" 2>&1 && detail=$(run_detail "$dir"); then
    pass "gpt2 $engine compile=$compile" "${GPT[0]#--task_args.preset=}, bf16: $detail"
  else fail "gpt2 $engine compile=$compile" "${detail:-$(last_line "$dir.log")}" "$dir.log"; fi
  detail=""
done

say() { echo "$*" | tee -a "$RESULTS"; }
say ""
say "Runs and logs: $WORK"
echo "results written to $RESULTS"
exit $FAILED
