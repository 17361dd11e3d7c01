#!/usr/bin/env bash
# stop 31 call 1: GPU ops check of 9cbfc2f/7911af5 (frozen projections' autocast casts) + the pinned bench, no searches
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep "Model name"; } > $OUT/host.txt 2>&1
t0=$(date +%s)
mkdir -p $OUT/checks
PYTHONPATH=src timeout 220 python benchmarks/ops_gpu_check.py --skip speed,models --out $OUT/checks > $OUT/checks/ops.log 2>&1; echo "ops rc=$? at $(( $(date +%s) - t0 ))s" >> $OUT/host.txt
grep -iE "fail|error|checks" $OUT/checks/ops.log | tail -8
OUT=$OUT PAIRED=6 CAP= FREEZE=0.9 MODES=full,ckpt,slimfit,slimfit-nopage \
  WORKLOADS="bert-base-seqcls:110:1 bert-base-qa:150:1 vit-base:110:1" bash benchmarks/run_gpu_bench.sh 2>&1 | grep -E "GPU bench|probe|paired|median|exit|ratio|slimfit|full|ckpt" | head -60
echo "total $(( $(date +%s) - t0 ))s" >> $OUT/host.txt
cat $OUT/host.txt
ls $OUT $OUT/checks
