#!/usr/bin/env bash
# slimfit bench on one GPU: the three workloads (bert-base seq-cls 128, bert-base QA 384,
# ViT-B/16 224 px), batch 128, every mode, plus the largest batch under 32 GiB, plus slimfit
# against full in alternating rounds (PAIRED); about 8-11 minutes in all. One process per
# workload (a crash or a hard timeout loses one workload, never the run; each process
# rewrites its JSON after every mode, so a killed one keeps the modes it finished).
# Writes into $OUT (default runs/gpu-bench):
#   bench.json, bench.md, bench.png   merged results of the three workloads
#   log.txt                           full log (nvidia-smi, progress, errors)
#   parts/<workload>.json             each process's own JSON
# and prints the compact table at the end. Run from the repository root:
#   bash benchmarks/run_gpu_bench.sh
# Knobs (environment): MODES, BATCH, CAP (empty: no max-batch search), STEPS, PROFILE, PAIRED (rounds of slimfit vs full
# timed alternately, 0: off), FREEZE (the SlimFit modes' freeze ratio; empty: the modes'
# 0.95), PYTHON, WORKLOADS ("name:timeout_s:budget_s ..."), PIN (the vCPU every bench
# process runs on, default the last one allowed; empty: unpinned). On the device machines
# (KVM guests) an unpinned process's host speed switches between two states ~2x apart
# within a minute, and host-bound steps (full's too) follow it; pinned, it stays in the
# fast one: benchmarks/results/2026-12-06-bench-host-probe-h100/NOTES.md.
set -u
OUT="${OUT:-runs/gpu-bench}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
MODES="${MODES:-full,ckpt,slimfit,full-fp32-eager,slimfit-paper,freeze-only,lora,slimfit-nopage,slimfit-qkv-codes}"
BATCH="${BATCH:-128}"
CAP="${CAP-32GiB}"  # CAP= (empty) skips the max-batch searches
STEPS="${STEPS:-20}"
PROFILE="${PROFILE---profile}"  # PROFILE= (empty) turns the one profiled step per mode off
PAIRED="${PAIRED:-6}"
FREEZE="${FREEZE:-}"
PIN="${PIN-auto}"
if [ "$PIN" = auto ]; then
  PIN="$(python3 -c 'import os; print(max(os.sched_getaffinity(0)))' 2>/dev/null || true)"
fi
PINNED=()
if [ -n "$PIN" ] && command -v taskset > /dev/null; then PINNED=(taskset -c "$PIN"); fi
# name:hard timeout (s):max-batch time budget (s, from process start; the searches run
# after every mode is timed, so the budget covers the timings too)
WORKLOADS="${WORKLOADS:-bert-base-seqcls:200:130 bert-base-qa:260:180 vit-base:200:130}"

mkdir -p "$OUT/parts"
LOG="$OUT/log.txt"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore::FutureWarning
TMP="$(mktemp -d)"
start=$(date +%s)

{
  echo "== $(date -u +%FT%TZ) slimfit GPU bench: modes=$MODES batch=$BATCH cap=$CAP steps=$STEPS freeze=${FREEZE:-0.95 (the modes)} pinned=${PINNED[*]:-no}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 || true
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" 2>&1
  git rev-parse HEAD 2>/dev/null || true
} | tee -a "$LOG"

for spec in $WORKLOADS; do
  IFS=: read -r w limit budget <<< "$spec"
  echo "== $w (timeout ${limit}s, max-batch budget ${budget}s) at +$(( $(date +%s) - start ))s" | tee -a "$LOG"
  timeout -k 10 "$limit" "${PINNED[@]}" "$PYTHON" -m slimfit.cli.bench --workload "$w" --mode "$MODES" \
    --batch-size "$BATCH" --steps "$STEPS" ${CAP:+--max-batch --memory-cap "$CAP"} \
    --time-budget "$budget" $PROFILE --paired-rounds "$PAIRED" ${FREEZE:+--freeze-ratio "$FREEZE"} \
    --no-png --output "$TMP/$w" \
    > "$TMP/$w.stdout" 2>&1
  rc=$?
  grep -v "^\s*$" "$TMP/$w.stdout" | grep -v "^wrote " >> "$LOG"
  grep -E "^  \S+ / |^    " "$TMP/$w.stdout" || true
  echo "== $w exit $rc$( [ "$rc" = 124 ] && echo ' (timed out; modes finished before it are kept)')" | tee -a "$LOG"
  if [ -f "$TMP/$w/bench.json" ]; then cp "$TMP/$w/bench.json" "$OUT/parts/$w.json"; fi
  if [ "$rc" != 0 ]; then tail -n 30 "$TMP/$w.stdout"; fi
done

echo "== merge at +$(( $(date +%s) - start ))s" | tee -a "$LOG"
if ls "$OUT"/parts/*.json > /dev/null 2>&1; then
  "$PYTHON" -m slimfit.bench.results merge "$OUT" "$OUT"/parts/*.json 2>&1 | tee -a "$LOG"
else
  echo "no workload produced results; see $LOG" | tee -a "$LOG"
  exit 1
fi
echo "== done in $(( $(date +%s) - start ))s; files in $OUT" | tee -a "$LOG"
