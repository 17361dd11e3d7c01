#!/usr/bin/env bash
# Vision accuracy on one GPU in one call (about 4-7 minutes on an H100): pretrain a
# DeiT-Tiny-sized ViT on Fashion-MNIST classes 0-4 (no pretrained ViT can be had offline),
# then fine-tune it on classes 5-9 with every policy (full, ILS / random at 0.90 and 0.95,
# LoRA r8, head-only), 3 seeds each, in parallel worker processes. Needs no network: the
# data is carried as .carry/fmnist/fashion-mnist.npz (write it here first with
#   python -m slimfit.data --write-npz .carry/fmnist
# ). Run from the repository root:
#   bash benchmarks/vision/run_gpu.sh
# Writes into $OUT (default runs/vision-gpu):
#   accuracy-fashion-mnist.json, accuracy-fashion-mnist.md   the sweep (rewritten after every job)
#   vit-fmnist-0-4/{config.json,model.safetensors,pretrain.json}   the pretrained ViT (11 MB)
#   log.txt                                                 full log
# Knobs (environment): DATA, PYTHON, SEEDS, WORKERS, GRID, VARIANTS, EPOCHS, PRETRAIN_EPOCHS,
# PRETRAIN_LIMIT (training seconds before pretraining stops early, recorded), TOTAL (seconds
# for the whole script; the sweep gets what pretraining leaves, and keeps finished jobs),
# PRETRAINED (a folder with a ViT this script pretrained before: config.json,
# model.safetensors, pretrain.json; fine-tunes it and skips pretraining, ~70 s of device
# time on an H200; the pretraining is deterministic, so it is the same model),
# PRETRAIN_ARGS / FINETUNE_ARGS (extra flags, e.g. for a tiny CPU dry run:
#   PRETRAIN_ARGS="--size test --max-steps 5 --precision fp32 --device cpu"
#   FINETUNE_ARGS="--max-steps 2 --precision fp32 --device cpu" SEEDS=0 WORKERS=2
#   VARIANTS=full-lr1e-4,ils90-lr4e-4 OUT=/tmp/vision-dry bash benchmarks/vision/run_gpu.sh ).
set -u -o pipefail
OUT="${OUT:-runs/vision-gpu}"
DATA="${DATA:-.carry/fmnist}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
SEEDS="${SEEDS:-0,1,2}"
WORKERS="${WORKERS:-12}"
GRID="${GRID:-main}"
VARIANTS="${VARIANTS:-}"
EPOCHS="${EPOCHS:-3}"
PRETRAIN_EPOCHS="${PRETRAIN_EPOCHS:-30}"
PRETRAIN_LIMIT="${PRETRAIN_LIMIT:-150}"
TOTAL="${TOTAL:-420}"
PRETRAINED="${PRETRAINED:-}"
PRETRAIN_ARGS="${PRETRAIN_ARGS:-}"
FINETUNE_ARGS="${FINETUNE_ARGS:-}"

mkdir -p "$OUT"
LOG="$OUT/log.txt"
MODEL="$OUT/vit-fmnist-0-4"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
export PYTHONWARNINGS=ignore::FutureWarning PYTHONUNBUFFERED=1
export SLIMFIT_VISION_DRIVER="bash benchmarks/vision/run_gpu.sh (SEEDS=$SEEDS WORKERS=$WORKERS GRID=$GRID EPOCHS=$EPOCHS PRETRAIN_EPOCHS=$PRETRAIN_EPOCHS${VARIANTS:+ VARIANTS=$VARIANTS}${PRETRAINED:+ PRETRAINED=$PRETRAINED})"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

{
  echo "== $(date -u +%FT%TZ) slimfit vision accuracy: seeds=$SEEDS workers=$WORKERS grid=$GRID epochs=$EPOCHS pretrain_epochs=$PRETRAIN_EPOCHS"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 || true
  "$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1
  git rev-parse HEAD 2>/dev/null || true
  ls -la "$DATA" 2>&1
} | tee -a "$LOG"

if [ -n "$PRETRAINED" ]; then
  for f in config.json model.safetensors pretrain.json; do
    if [ ! -f "$PRETRAINED/$f" ]; then
      echo "PRETRAINED=$PRETRAINED has no $f; point it at a folder this script pretrained, or leave it unset" | tee -a "$LOG"
      exit 1
    fi
  done
  echo "== pretrained model from $PRETRAINED (pretraining skipped)" | tee -a "$LOG"
  mkdir -p "$MODEL" && cp "$PRETRAINED"/config.json "$PRETRAINED"/model.safetensors "$PRETRAINED"/pretrain.json "$MODEL"/
else
  echo "== pretrain (classes 0-4) at +$(elapsed)s" | tee -a "$LOG"
  timeout -k 10 $(( PRETRAIN_LIMIT + 60 )) "$PYTHON" benchmarks/vision/pretrain_vit.py \
    --data-dir "$DATA" --out "$MODEL" --epochs "$PRETRAIN_EPOCHS" \
    --time-limit-s "$PRETRAIN_LIMIT" $PRETRAIN_ARGS 2>&1 | tee -a "$LOG"
  rc=$?
  echo "== pretrain exit $rc at +$(elapsed)s" | tee -a "$LOG"
fi
if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "no pretrained model in $MODEL; stopping" | tee -a "$LOG"
  exit 1
fi

left=$(( TOTAL - $(elapsed) - 15 ))
[ "$left" -lt 60 ] && left=60
echo "== fine-tune sweep (classes 5-9), limit ${left}s, at +$(elapsed)s" | tee -a "$LOG"
# One intra-op thread per worker: the workers only launch kernels; more threads fight
# over the machine's cores.
OMP_NUM_THREADS=1 timeout -k 10 "$left" "$PYTHON" benchmarks/vision/finetune_vit.py \
  --pretrained "$MODEL" --data-dir "$DATA" --grid "$GRID" ${VARIANTS:+--variants "$VARIANTS"} \
  --seeds "$SEEDS" --epochs "$EPOCHS" --workers "$WORKERS" --out "$OUT" $FINETUNE_ARGS 2>&1 | tee -a "$LOG"
rc=$?
echo "== fine-tune exit $rc$( [ "$rc" = 124 ] && echo ' (timed out; the jobs finished before it are in the report)') at +$(elapsed)s" | tee -a "$LOG"
ls -la "$OUT" "$MODEL" | tee -a "$LOG"
[ -f "$OUT/accuracy-fashion-mnist.md" ] && cat "$OUT/accuracy-fashion-mnist.md"
echo "== done in $(elapsed)s; files in $OUT" | tee -a "$LOG"
