#!/usr/bin/env bash
# stop 30 call 1: where seq-cls host time goes (batch 2 = host cost; batch 128 = real step)
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
L=$OUT/log.txt
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep "Model name"; git log -1 --format=%h; } >> $L 2>&1
t0=$(date +%s)
PYTHONPATH=src timeout 200 python benchmarks/step_profile_gpu.py --workload bert-base-seqcls --mode full,slimfit-nopage,slimfit --batch-size 2 --freeze-ratio 0.9 --steps 30 --top 60 --out $OUT/b2 >> $L 2>&1; echo "b2 rc=$? at $(( $(date +%s) - t0 ))s" >> $L
PYTHONPATH=src timeout 200 python benchmarks/step_profile_gpu.py --workload bert-base-seqcls --mode full,slimfit-nopage,slimfit --batch-size 128 --freeze-ratio 0.9 --steps 30 --top 30 --out $OUT/b128 >> $L 2>&1; echo "b128 rc=$? at $(( $(date +%s) - t0 ))s" >> $L
grep -v -i warn $L | cut -c1-300 | head -150
