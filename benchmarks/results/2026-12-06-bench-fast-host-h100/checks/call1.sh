#!/usr/bin/env bash
# stop 28 call 1: GPU ops check (fixed frozen-linear check), the full bench (mask dropped),
# and seq-cls on dynamically padded batches, full vs slimfit
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
L=$OUT/log.txt
mkdir -p $OUT/ops $OUT/bench $OUT/padded
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; lscpu | grep "Model name"; git rev-parse HEAD; } >> $L 2>&1
t0=$(date +%s)
PYTHONPATH=src timeout 110 python benchmarks/ops_gpu_check.py --skip speed,models --out $OUT/ops > $OUT/ops/ops.log 2>&1
echo "ops check rc=$? in $(( $(date +%s) - t0 ))s; ok $(grep -cE '\[ok' $OUT/ops/ops.log)" | tee -a $L
grep -E "FAIL" $OUT/ops/ops.log | head -10 | tee -a $L
OUT=$OUT/bench FREEZE=0.9 MODES=full,ckpt,slimfit,full-fp32-eager,freeze-only,slimfit-nopage,slimfit-projcopy WORKLOADS="bert-base-seqcls:140:45 bert-base-qa:180:60 vit-base:140:45" bash benchmarks/run_gpu_bench.sh > $OUT/bench_stdout.txt 2>&1
tail -32 $OUT/bench_stdout.txt
echo "bench done at $(( $(date +%s) - t0 ))s" | tee -a $L
PYTHONPATH=src timeout 70 python -m slimfit.cli.bench --workload bert-base-seqcls --mode full,slimfit \
  --freeze-ratio 0.9 --attention-mask padded --paired-rounds 6 --no-png --output $OUT/padded > $OUT/padded/stdout.txt 2>&1
echo "padded rc=$? at $(( $(date +%s) - t0 ))s" | tee -a $L
grep -E "^  \S+ / |^    |paired" $OUT/padded/stdout.txt | tee -a $L
echo "total $(( $(date +%s) - t0 ))s" | tee -a $L
