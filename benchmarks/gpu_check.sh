#!/usr/bin/env bash
# GPU acceptance check: one prepared run on a machine with one NVIDIA GPU, under 8 minutes on an
# H100/H200 with the preinstalled torch (2.11 or newer) and nothing to install.
#
#   bash benchmarks/gpu_check.sh [OUT]      (default: benchmarks/results/gpu_check)
#
# Writes OUT/gpu_check.md (the table, printed row by row as it goes) and every run's log under
# OUT/logs, so a caller can point OUT at a folder that comes back ($OUT on the lent machines).
# Rows run cheap first, each under its own timeout; exit 1 if any row failed.
#   doctor          `dtrain doctor` passes
#   collectives     the NCCL paths at world size 1: DDP forced on, all_reduce, objects, barrier,
#                   the stop vote (async all-reduce read through pinned memory), pinned copies
#   fp32 / bf16 / fp16
#                   charlm tiny converges (fp32 with TF32 off; fp16 with the GradScaler)
#   bf16 vs fp32    the bf16 run's final eval loss within 5% of the fp32 (TF32 off) run's
#   engines agree   digits in float64 at world size 1 through `dtrain launch`: ddp (wrapped in DDP:
#                   ddp.wrap_one_rank), ddp with 4 micro-batches, and fsdp end equal (1e-9)
#   resume          digits, ddp: a checkpoint, SIGTERM (exit 143), a rerun that resumes and ends
#                   bit-identical to an uninterrupted run
#   fsdp resume     fsdp stopped half-way resumes bit-identical under fsdp; a ddp checkpoint
#                   continues under fsdp and an fsdp one under ddp, equal to the reference (1e-9)
#   cpu offload     fsdp.cpu_offload through `dtrain launch` (NCCL beside gloo) trains
#   cpu load        final_model.pt loads with weights_only=True where no GPU is visible
#   exact eval      the eval loss in summary.json equals the loss recomputed on CPU (TF32 off)
#   gpt2 ...        GPT-2 small (lm task) in bf16 through `dtrain launch`: ddp (wrapped) eager and
#                   compiled, fsdp: tokens/s, MFU, peak memory, compile time, checkpoint stall
#   fabric gpt2     Lightning Fabric's plain loop on the same model, data, batch and precision:
#                   tokens/s beside dtrain's eager ddp row
# GPU_CHECK_ROWS="resume,exact eval" (names as in the table, comma-separated) runs only those rows
# and the rows whose runs they read (exact eval reads resume's): a rerun after a fix.
# GPU_CHECK_DRY=1 runs every row small on CPU (gloo, tiny models, no compile): the suite runs it
# (tests/e2e/test_benchmark_scripts.py) to test the script itself. PEAK_TFLOPS=... gives MFU on a
# GPU the peak table lacks. GPU_CHECK_BUDGET_S=N bounds the whole script (a machine lent for a few
# minutes): no row runs past N seconds from the start, and a row with under 10 s left is NOT RUN
# (exit 1), so the table is complete and written before a caller's own time limit ends. The runs'
# folders (in the temporary directory) are removed when every row passed, kept when one failed or
# with GPU_CHECK_KEEP=1.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu_check}
PY=${PYTHON:-python3}
DTRAIN=("$PY" -m distributed_train)
COMMON=(--log.wandb=disabled)
[ -n "${PEAK_TFLOPS:-}" ] && COMMON+=("--log.peak_tflops=$PEAK_TFLOPS")

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  DRY=1; BACKEND=gloo; PRECISIONS="fp32 bf16"; SMALL_STEPS=30; LOG_EVERY=5; RESUME_STEPS=60; EQUAL_STEPS=12
  GPT=(--task_args.preset=tiny --task_args.seq_len=64 --train.batch_size=8); GPT_STEPS=12; COMPILE_MODES="false"
  FABRIC_ARGS=(--task-arg preset=tiny --task-arg seq_len=64 --batch-size 8)
else
  DRY=0; BACKEND=nccl; PRECISIONS="fp32 bf16 fp16"; SMALL_STEPS=150; LOG_EVERY=10; RESUME_STEPS=3000
  EQUAL_STEPS=40; GPT=(--task_args.preset=gpt2-small --train.batch_size=32); GPT_STEPS=60
  COMPILE_MODES="false true"; FABRIC_ARGS=(--task-arg preset=gpt2-small --batch-size 32)
fi
# One rank through dtrain launch (torchrun): the NCCL (or, dry, gloo) paths.
LAUNCH=(launch --nproc-per-node 1 --dist.backend=$BACKEND)

# The rows, in the order they run, and the rows whose runs a row reads (run with it when named alone).
ROWS=(doctor collectives $PRECISIONS "bf16 vs fp32" "engines agree" resume "fsdp resume" "cpu offload" "cpu load"
      "exact eval")
for c in $COMPILE_MODES; do ROWS+=("gpt2 ddp compile=$c"); done
ROWS+=("gpt2 fsdp compile=false" "fabric gpt2")
declare -A READS=(["bf16 vs fp32"]="fp32,bf16" ["cpu load"]=resume ["exact eval"]=resume
                  ["fabric gpt2"]="gpt2 ddp compile=false")
usage_error() { echo "gpu_check.sh: $1" >&2; exit 2; }

BUDGET=${GPU_CHECK_BUDGET_S:-}
if [ -n "$BUDGET" ] && ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
  usage_error "GPU_CHECK_BUDGET_S must be a whole number of seconds, not '$BUDGET'"
fi
declare -A SELECTED=()  # empty: every row
if [ -n "${GPU_CHECK_ROWS:-}" ]; then
  IFS=, read -ra named <<< "$GPU_CHECK_ROWS"
  for name in "${named[@]}"; do
    known=0; for r in "${ROWS[@]}"; do [ "$r" = "$name" ] && known=1; done
    [ $known = 1 ] || usage_error "GPU_CHECK_ROWS: no row '$name'; the rows: $(IFS=,; echo "${ROWS[*]}")"
    SELECTED[$name]=1
    if [ -n "${READS[$name]:-}" ]; then
      IFS=, read -ra reads <<< "${READS[$name]}"; for r in "${reads[@]}"; do SELECTED[$r]=1; done
    fi
  done
fi

LOGS="$OUT/logs"
RESULTS="$OUT/gpu_check.md"
mkdir -p "$LOGS"
WORK=$(mktemp -d -t dtrain-gpu-check-XXXX)
export WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS: the resume checks compare bits

FAILED=0
NOT_RUN=0
row() { echo "| $1 | $2 | $3 |" | tee -a "$RESULTS"; }
pass() { row "$1" PASS "$2"; }
skip() { row "$1" SKIP "$2"; }
fail() { row "$1" "**FAIL**" "$2 (log: logs/$3)"; FAILED=1; }
last_line() { tail -n "${2:-1}" "$1" 2>/dev/null | tr '\n|' ' /' | cut -c1-160; }
# limited SECONDS CMD...: the command, killed (TERM, then KILL) after SECONDS; exit 124 then.
limited() { local seconds=$1; shift; timeout --kill-after=10 "$seconds" "$@"; }
# check NAME SECONDS LOG FUNCTION: runs FUNCTION (its last output line is the detail) under a time limit.
check() {
  local name=$1 seconds=$2 log=$3 fn=$4 detail code cut=""
  [ ${#SELECTED[@]} = 0 ] || [ -n "${SELECTED[$name]:-}" ] || return 0  # GPU_CHECK_ROWS left it out
  if [ -n "$BUDGET" ]; then  # SECONDS: bash's seconds since the script started
    local left=$((BUDGET - SECONDS - 10))  # 10: limited's wait between TERM and KILL
    if [ $left -lt 10 ]; then
      row "$name" "NOT RUN" "GPU_CHECK_BUDGET_S=$BUDGET: $((BUDGET > SECONDS ? BUDGET - SECONDS : 0)) s left"
      FAILED=1; NOT_RUN=$((NOT_RUN + 1)); return
    fi
    [ $left -lt "$seconds" ] && { seconds=$left; cut=" (the end of GPU_CHECK_BUDGET_S=$BUDGET)"; }
  fi
  detail=$(limited "$seconds" bash -c "$(declare -f "$fn" run_detail compare_models); $(declare -p WORK LOGS PY \
    BACKEND DRY SMALL_STEPS LOG_EVERY RESUME_STEPS EQUAL_STEPS GPT GPT_STEPS COMMON DTRAIN LAUNCH FABRIC_ARGS \
    TOKENS 2>/dev/null); $fn" 2>>"$LOGS/$log")
  code=$?
  detail=$(echo "$detail" | tail -1)
  if [ $code = 0 ]; then pass "$name" "$detail"
  elif [ $code = 3 ]; then skip "$name" "$detail"
  elif [ $code = 124 ] || [ $code = 137 ]; then fail "$name" "timed out after ${seconds}s$cut" "$log"
  else fail "$name" "${detail:-exit $code}" "$log"; fi
}

{
  echo "## GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | sed 's/^/GPU: /' || echo "GPU: none (nvidia-smi not found)"
  "$PY" -c 'import sys, torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL", torch.cuda.nccl.version() if torch.cuda.is_available() else "-", f"Python {sys.version.split()[0]}")'
  [ "$DRY" = 1 ] && echo "DRY RUN on CPU (GPU_CHECK_DRY=1): tests the script, not a GPU"
  [ ${#SELECTED[@]} -gt 0 ] && echo "Only GPU_CHECK_ROWS=$GPU_CHECK_ROWS and the rows whose runs they read"
  echo
  echo "| check | result | detail |"
  echo "| --- | --- | --- |"
} | tee "$RESULTS"

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
for key, fmt in (("tokens_per_s", "{:,.0f} tokens/s"), ("samples_per_s", "{:,.1f} samples/s"), ("mfu", "MFU {:.1%}"),
                 ("peak_mem_gib", "peak {:.1f} GiB")):
    values = [e[key] for e in steady if isinstance(e.get(key), (int, float))]
    if values:
        parts.append(fmt.format(statistics.median(values)))
if len(train) > 1:  # the first window's extra time over a steady window of as many steps: mostly compilation
    per_step = statistics.median(e["step_time_s"] for e in steady)
    parts.append(f"first window +{max(0.0, (train[0]['step_time_s'] - per_step) * train[0]['step']):.1f} s")
stalls = [e["stall_s"] for e in events if e.get("kind") == "checkpoint"]
if stalls:
    parts.append(f"checkpoint stall {statistics.median(stalls):.3f} s (median of {len(stalls)})")
print(", ".join(parts))
sys.exit(0 if math.isfinite(last) and last < first else 1)
EOF
}

# compare_models A B TOLERANCE LABEL: the largest difference of two final_model.pt (0: bitwise).
compare_models() {
  "$PY" - "$1" "$2" "$3" "$4" <<'EOF'
import sys, torch
a = torch.load(f"{sys.argv[1]}/final_model.pt", weights_only=True)
b = torch.load(f"{sys.argv[2]}/final_model.pt", weights_only=True)
tolerance, label = float(sys.argv[3]), sys.argv[4]
assert a.keys() == b.keys(), "different parameters"
diff = max((x.double() - y.double()).abs().max().item() for x, y in zip(a.values(), [b[k] for k in a]))
print(f"{label}: largest difference {diff:.2e} (allowed {tolerance:g})")
sys.exit(0 if diff <= tolerance else 1)
EOF
}

# -- doctor, collectives --------------------------------------------------------------------------
doctor_check() {
  "${DTRAIN[@]}" doctor > "$LOGS/doctor.log" 2>&1; local code=$?
  # Dry, on a CPU shared with other work (the suite's other tests), one rank's matmul can get a
  # fraction of a core: the doctor is right to say so, and it says nothing about the script.
  local findings; findings=$(sed -n 's/^verdict: UNHEALTHY ([^)]*): //p' "$LOGS/doctor.log" | sed 's/; /\n/g')
  if [ $code != 0 ] && [ "$DRY" = 1 ] && [ -n "$findings" ] \
      && ! echo "$findings" | grep -vqE '^rank [0-9]+ matmul [0-9.e-]+ TFLOP/s is under [0-9.]+x the median'; then
    echo "every check ran; the one finding, a rank's matmul speed, is this shared CPU's (dry run)"; return 0
  fi
  tail -1 "$LOGS/doctor.log"; return $code
}
check doctor 90 doctor.log doctor_check

collectives_check() {
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 --log-dir "$WORK/torchrun" benchmarks/gpu_collectives.py \
    --backend "$BACKEND" > "$LOGS/collectives.log" 2>&1 || { grep -m1 -e FAILED -e Error "$LOGS/collectives.log"; return 1; }
  echo "$(grep -c '^ok:' "$LOGS/collectives.log") checks on $BACKEND"
}
check collectives 90 collectives.log collectives_check

# -- precisions converge; bf16 against fp32 without TF32 --------------------------------------------
for precision in $PRECISIONS; do
  export PRECISION=$precision
  precision_check() {
    local dir="$WORK/charlm-$PRECISION"
    "${DTRAIN[@]}" train --task=charlm --train.precision="$PRECISION" --train.tf32=false --train.batch_size=64 \
      --train.max_steps=$SMALL_STEPS --train.warmup_steps=10 --train.grad_clip=1.0 --train.lr=2e-3 --seed=0 \
      --log.every_steps=$LOG_EVERY --run_dir="$dir" "${COMMON[@]}" > "$LOGS/charlm-$PRECISION.log" 2>&1 \
      || { tail -1 "$LOGS/charlm-$PRECISION.log"; return 1; }
    echo "charlm tiny: $(run_detail "$dir")"
  }
  check "$precision" 120 "charlm-$precision.log" precision_check
done
numerics_check() {
  "$PY" - "$WORK/charlm-bf16" "$WORK/charlm-fp32" <<'EOF'
import json, sys
bf16, fp32 = (json.load(open(f"{run}/summary.json"))["eval"]["loss"] for run in sys.argv[1:])
gap = abs(bf16 - fp32) / fp32
print(f"eval loss bf16 {bf16:.4f} vs fp32 (TF32 off) {fp32:.4f}: {gap:.1%} apart (allowed 5%)")
sys.exit(0 if gap <= 0.05 else 1)
EOF
}
check "bf16 vs fp32" 30 numerics.log numerics_check

# -- the engines agree at world size 1 (float64: the same math, to rounding) ------------------------
equal_check() {
  local base=(--task=digits --train.precision=fp64 --train.batch_size=32 --train.max_steps=$EQUAL_STEPS --seed=0
              --log.every_steps=$EQUAL_STEPS --eval.every_steps=0 "${COMMON[@]}")
  "${DTRAIN[@]}" "${LAUNCH[@]}" "${base[@]}" --ddp.wrap_one_rank=true --run_dir="$WORK/eq-ddp" > "$LOGS/equal.log" 2>&1 &&
  "${DTRAIN[@]}" "${LAUNCH[@]}" "${base[@]}" --ddp.wrap_one_rank=true --train.micro_batch_size=8 \
    --run_dir="$WORK/eq-accum" >> "$LOGS/equal.log" 2>&1 &&
  "${DTRAIN[@]}" "${LAUNCH[@]}" "${base[@]}" --engine=fsdp --run_dir="$WORK/eq-fsdp" >> "$LOGS/equal.log" 2>&1 \
    || { tail -1 "$LOGS/equal.log"; return 1; }
  local accum fsdp
  accum=$(compare_models "$WORK/eq-ddp" "$WORK/eq-accum" 1e-9 "ddp vs 4 micro-batches") || { echo "$accum"; return 1; }
  fsdp=$(compare_models "$WORK/eq-ddp" "$WORK/eq-fsdp" 1e-9 "ddp vs fsdp") || { echo "$fsdp"; return 1; }
  echo "DDP-wrapped; $accum; $fsdp"
}
check "engines agree" 180 equal.log equal_check

# -- checkpoint, SIGTERM, resume bit-identical (ddp through dtrain launch) ----------------------------
resume_check() {
  local args=("${LAUNCH[@]}" --task=digits --train.max_steps=$RESUME_STEPS --checkpoint.every_steps=20
              --log.every_steps=20 --train.tf32=false "${COMMON[@]}")
  "${DTRAIN[@]}" "${args[@]}" --run_dir="$WORK/reference" > "$LOGS/reference.log" 2>&1 \
    || { tail -1 "$LOGS/reference.log"; return 1; }
  "${DTRAIN[@]}" "${args[@]}" --run_dir="$WORK/stopped" > "$LOGS/stopped.log" 2>&1 &
  local pid=$! waited=0
  until ls "$WORK"/stopped/checkpoints/step-*/COMMITTED > /dev/null 2>&1; do
    sleep 0.1; waited=$((waited + 1))
    if [ $waited -gt 1200 ] || ! kill -0 $pid 2> /dev/null; then echo "no checkpoint before the end"; return 1; fi
  done
  kill -TERM $pid; wait $pid; local code=$?
  [ $code = 143 ] || { echo "SIGTERM gave exit $code, not 143"; return 1; }
  "${DTRAIN[@]}" "${args[@]}" --run_dir="$WORK/stopped" > "$LOGS/resumed.log" 2>&1 \
    || { tail -1 "$LOGS/resumed.log"; return 1; }
  compare_models "$WORK/reference" "$WORK/stopped" 0 "stopped by SIGTERM (exit 143), resumed" || return 1
}
check resume 150 resume.log resume_check

# -- fsdp: resume bit-identical, and across engines (float64) --------------------------------------
fsdp_resume_check() {
  local base=(--task=digits --train.precision=fp64 --train.batch_size=32 --checkpoint.every_steps=10
              --log.every_steps=10 --eval.every_steps=0 --seed=0 "${COMMON[@]}")
  local half=$((EQUAL_STEPS / 2))
  run() { "${DTRAIN[@]}" "${LAUNCH[@]}" "${base[@]}" "$@" >> "$LOGS/fsdp-resume.log" 2>&1; }
  # References, then runs stopped half-way; each stopped run is resumed by the other engine
  # (checkpoint.resume=its run directory: its newest checkpoint) and then by its own.
  run --engine=fsdp --train.max_steps=$EQUAL_STEPS --run_dir="$WORK/fs-ref" &&
  run --engine=ddp --train.max_steps=$EQUAL_STEPS --run_dir="$WORK/dd-ref" &&
  run --engine=fsdp --train.max_steps=$half --run_dir="$WORK/fs-half" &&
  run --engine=ddp --train.max_steps=$half --run_dir="$WORK/dd-half" &&
  run --engine=ddp --train.max_steps=$EQUAL_STEPS --run_dir="$WORK/fs-to-dd" --checkpoint.resume="$WORK/fs-half" &&
  run --engine=fsdp --train.max_steps=$EQUAL_STEPS --run_dir="$WORK/dd-to-fs" --checkpoint.resume="$WORK/dd-half" &&
  run --engine=fsdp --train.max_steps=$EQUAL_STEPS --run_dir="$WORK/fs-half" \
    || { tail -1 "$LOGS/fsdp-resume.log"; return 1; }
  compare_models "$WORK/fs-ref" "$WORK/fs-half" 0 "fsdp resumed" > /dev/null || { echo "fsdp resume not bit-identical"; return 1; }
  local a b
  a=$(compare_models "$WORK/dd-ref" "$WORK/dd-to-fs" 1e-9 "ddp -> fsdp") || { echo "$a"; return 1; }
  b=$(compare_models "$WORK/fs-ref" "$WORK/fs-to-dd" 1e-9 "fsdp -> ddp") || { echo "$b"; return 1; }
  echo "fsdp resume bit-identical; $a; $b"
}
check "fsdp resume" 240 fsdp-resume.log fsdp_resume_check

# -- fsdp.cpu_offload through dtrain launch ----------------------------------------------------------
offload_check() {
  [ "$DRY" = 1 ] && { echo "needs CUDA (on CPU the state already lives in host memory)"; return 3; }
  "${DTRAIN[@]}" "${LAUNCH[@]}" --engine=fsdp --fsdp.cpu_offload=true --task=charlm --train.max_steps=40 \
    --train.grad_clip=1.0 --log.every_steps=10 --run_dir="$WORK/offload" "${COMMON[@]}" > "$LOGS/offload.log" 2>&1 \
    || { tail -1 "$LOGS/offload.log"; return 1; }
  echo "charlm tiny, fsdp with CPU offload, clipped: $(run_detail "$WORK/offload")"
}
check "cpu offload" 120 offload.log offload_check

# -- final_model.pt on a machine without a GPU, and exact evaluation --------------------------------
cpu_load_check() {
  CUDA_VISIBLE_DEVICES="" "$PY" - "$WORK/reference" <<'EOF'
import sys, torch
state = torch.load(f"{sys.argv[1]}/final_model.pt", weights_only=True)  # no map_location: must be CPU already
assert all(t.device.type == "cpu" for t in state.values()), "tensors not on the CPU"
print(f"{len(state)} tensors, all CPU, loaded with weights_only=True and no GPU visible")
EOF
}
check "cpu load" 60 cpu-load.log cpu_load_check

exact_eval_check() {
  "$PY" - "$WORK/reference" <<'EOF'
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
print(f"eval loss {logged:.6f} (run, TF32 off) vs {cpu_loss:.6f} (CPU, every sample once)")
sys.exit(0 if abs(cpu_loss - logged) <= 1e-4 * max(1.0, abs(cpu_loss)) else 1)
EOF
}
check "exact eval" 60 exact-eval.log exact_eval_check

# -- GPT-2 small in bf16 through dtrain launch: ddp (DDP-wrapped) eager and compiled, fsdp ----------
TOKENS=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from workloads import ensure_lm_tokens; print(ensure_lm_tokens())')
export TOKENS
for variant in $(for c in $COMPILE_MODES; do echo "ddp-$c"; done) fsdp-false; do
  export VARIANT=$variant
  gpt_check() {
    local engine=${VARIANT%-*} compile=${VARIANT#*-} dir="$WORK/gpt-$VARIANT"
    "${DTRAIN[@]}" "${LAUNCH[@]}" --task=lm "${GPT[@]}" --task_args.train="$TOKENS" --task_args.dtype=uint16 \
      --task_args.vocab_size=50257 --eval.max_samples=256 --engine="$engine" --ddp.wrap_one_rank=true \
      --train.precision=bf16 --train.compile=$compile --train.max_steps=$GPT_STEPS --train.warmup_steps=10 \
      --train.grad_clip=1.0 --train.lr=6e-4 --log.every_steps=10 --checkpoint.every_steps=20 --eval.batch_size=64 \
      --run_dir="$dir" "${COMMON[@]}" > "$LOGS/gpt-$VARIANT.log" 2>&1 || { tail -1 "$LOGS/gpt-$VARIANT.log"; return 1; }
    echo "${GPT[0]#--task_args.preset=}, bf16: $(run_detail "$dir")"
  }
  check "gpt2 ${variant%-*} compile=${variant#*-}" 240 "gpt-$variant.log" gpt_check
done

fabric_check() {
  "$PY" -c "import lightning" 2>/dev/null || { echo "lightning is not installed"; return 3; }
  local out
  out=$("$PY" benchmarks/fabric_lm.py --steps $GPT_STEPS --precision bf16 "${FABRIC_ARGS[@]}" \
        --task-arg train="$TOKENS" --task-arg dtype=uint16 --task-arg vocab_size=50257 2> "$LOGS/fabric.log" \
        | tail -1) || { tail -1 "$LOGS/fabric.log"; return 1; }
  "$PY" - "$out" "$WORK/gpt-ddp-false" <<'EOF'
import json, statistics, sys
fabric = json.loads(sys.argv[1])
events = [json.loads(line) for line in open(f"{sys.argv[2]}/metrics.jsonl")]
rates = [e["tokens_per_s"] for e in events if e.get("kind") == "train" and "tokens_per_s" in e]
ours = statistics.median(rates[1:] or rates)
print(f"Fabric {fabric['tokens_per_s']:,.0f} tokens/s, dtrain eager ddp {ours:,.0f} tokens/s "
      f"({ours / fabric['tokens_per_s']:.2f}x); Fabric loss {fabric['loss_first']:.3f} -> {fabric['loss_last']:.3f}")
EOF
}
check "fabric gpt2" 180 fabric.log fabric_check

say() { echo "$*" | tee -a "$RESULTS"; }
say ""
[ $NOT_RUN -gt 0 ] && say "$NOT_RUN rows NOT RUN: GPU_CHECK_BUDGET_S=$BUDGET was spent before them"
if [ $FAILED = 0 ] && [ "${GPU_CHECK_KEEP:-0}" != 1 ]; then
  rm -rf "$WORK"  # every row passed: the runs' folders (checkpoints, GBs on a GPU) go
  say "Logs: $LOGS (the runs' folders are removed when every row passed; GPU_CHECK_KEEP=1 keeps them)"
elif rmdir "$WORK" 2> /dev/null; then  # no row ran: nothing to keep
  say "Logs: $LOGS"
else
  say "Runs: $WORK; logs: $LOGS"
fi
echo "results written to $RESULTS"
exit $FAILED
