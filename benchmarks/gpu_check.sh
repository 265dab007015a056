#!/usr/bin/env bash
# GPU check: one prepared command for a machine with one NVIDIA GPU, done in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [RESULTS.md]      (default: benchmarks/results/gpu_check.md)
#
# 1. the NCCL path (dtrain launch, world size 1) of the digits task;
# 2. bf16 and fp16 training steps (charlm tiny) that must end with a finite, falling loss;
# 3. the lm task at GPT-2-small size (12 layers, d768, seq_len 1024, GPT-2's 50257-token
#    vocabulary) on a memory-mapped token file (the KJV text as byte tokens) in bf16, eager and with
#    train.compile, printing tokens/s and MFU against the GPU's dense bf16 peak (989 TFLOP/s for
#    an H100 SXM; set PEAK_TFLOPS=... for a GPU the table in distributed_train/flops.py lacks).
# GPU_CHECK_DRY=1 runs the same steps small on CPU (gloo, no fp16, no compile) to test the script.
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results/gpu_check.md}
mkdir -p "$(dirname "$RESULTS")"
WORK=$(mktemp -d -t dtrain-gpu-check-XXXX)
export WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
COMMON=(--log.wandb=disabled --checkpoint.every_steps=0)
[ -n "${PEAK_TFLOPS:-}" ] && COMMON+=("--log.peak_tflops=$PEAK_TFLOPS")

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  BACKEND=auto; PRECISIONS="bf16"; GPT=(--task_args.preset=tiny --task_args.seq_len=64 --train.batch_size=8); GPT_STEPS=12
  COMPILE_MODES="false"; SMALL_STEPS=12; LOG_EVERY=4
else
  BACKEND=nccl; PRECISIONS="bf16 fp16"; GPT=(--task_args.preset=gpt2-small --train.batch_size=32); GPT_STEPS=80
  COMPILE_MODES="false true"; SMALL_STEPS=100; LOG_EVERY=10
fi

say() { echo "$*" | tee -a "$RESULTS"; }
record() { local line; line=$(summary "$1" "$2"); say "$line"; }  # stops the script on a bad run
summary() {  # summary.json / metrics.jsonl of a run -> one Markdown line (fails on a bad loss)
  "$PY" - "$1" "$2" <<'EOF'
import json, math, statistics, sys
run, label = sys.argv[1], sys.argv[2]
summary = json.load(open(f"{run}/summary.json"))
events = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"train"' in l]
events = [e for e in events if e.get("kind") == "train"]
first, last = events[0]["loss"], summary["train_loss"]
if not (math.isfinite(last) and last < first):
    sys.exit(f"{label}: loss did not fall ({first} -> {last})")
steady = events[1:] or events  # the first window holds warm-up and compilation
line = f"| {label} | {summary['world_size']} | {first:.3f} -> {last:.3f}"
for key, fmt in (("tokens_per_s", "{:,.0f}"), ("samples_per_s", "{:,.1f}"), ("mfu", "{:.1%}")):
    values = [e[key] for e in steady if isinstance(e.get(key), (int, float))]
    line += " | " + (fmt.format(statistics.median(values)) if values else "-")
print(line + f" | {summary['wall_s']:.0f} s |")
EOF
}

{
  echo "## GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | sed 's/^/GPU: /' || echo "GPU: none (nvidia-smi not found)"
  "$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL", torch.cuda.nccl.version() if torch.cuda.is_available() else "-")'
  echo
  echo "| run | world size | loss first -> last window | tokens/s | samples/s | MFU | train s |"
  echo "| --- | ---: | --- | ---: | ---: | ---: | ---: |"
} | tee "$RESULTS"

# 1. NCCL through torchrun (dtrain launch), world size 1.
"$PY" -m distributed_train launch --nproc-per-node 1 --task=digits --dist.backend=$BACKEND \
  --train.max_steps=$SMALL_STEPS --log.every_steps=$LOG_EVERY --run_dir="$WORK/nccl" "${COMMON[@]}" > "$WORK/nccl.log" 2>&1 \
  || { tail -30 "$WORK/nccl.log"; exit 1; }
record "$WORK/nccl" "digits, dtrain launch, dist.backend=$BACKEND"

# 2. Mixed precision steps (fp16 adds the GradScaler).
for precision in $PRECISIONS; do
  "$PY" -m distributed_train train --task=charlm --train.precision=$precision --train.batch_size=64 \
    --train.max_steps=$SMALL_STEPS --log.every_steps=$LOG_EVERY --run_dir="$WORK/$precision" "${COMMON[@]}" \
    > "$WORK/$precision.log" 2>&1 || { tail -30 "$WORK/$precision.log"; exit 1; }
  record "$WORK/$precision" "charlm tiny, $precision"
done

# 3. GPT-2 small (lm task over a memory-mapped token file) in bf16, eager and compiled: throughput and MFU.
TOKENS=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from workloads import ensure_lm_tokens; print(ensure_lm_tokens())')
for compile in $COMPILE_MODES; do
  "$PY" -m distributed_train train --task=lm "${GPT[@]}" --task_args.train="$TOKENS" \
    --task_args.dtype=uint16 --task_args.vocab_size=50257 --eval.max_samples=256 --train.precision=bf16 \
    --train.compile=$compile --train.max_steps=$GPT_STEPS --log.every_steps=$LOG_EVERY --eval.batch_size=64 \
    --run_dir="$WORK/gpt-$compile" "${COMMON[@]}" > "$WORK/gpt-$compile.log" 2>&1 \
    || { tail -30 "$WORK/gpt-$compile.log"; exit 1; }
  record "$WORK/gpt-$compile" "lm ${GPT[0]#--task_args.preset=}, bf16, compile=$compile"
done

say ""
say "Runs and logs: $WORK"
echo "results written to $RESULTS"
