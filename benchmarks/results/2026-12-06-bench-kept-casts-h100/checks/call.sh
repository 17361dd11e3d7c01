#!/usr/bin/env bash
# stop 31 call 3: GPU ops check of the kept frozen casts, then the full pinned bench (the README run)
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
mkdir -p $OUT/checks
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep "Model name"; } > $OUT/checks/host.txt 2>&1
t0=$(date +%s)
PYTHONPATH=src timeout 110 python benchmarks/ops_gpu_check.py --skip speed,models --out $OUT/checks > $OUT/checks/ops_log.txt 2>&1; echo "ops rc=$? at $(( $(date +%s) - t0 ))s" >> $OUT/checks/host.txt
grep -E "checks:|FAIL" $OUT/checks/ops_log.txt | head -6
rm -f $OUT/checks/ops_gpu_check.json
OUT=$OUT FREEZE=0.9 MODES=full,ckpt,slimfit,full-fp32-eager,slimfit-nopage \
  WORKLOADS="bert-base-seqcls:170:110 bert-base-qa:200:140 vit-base:165:105" bash benchmarks/run_gpu_bench.sh 2>&1 | grep -E "paired|median|PASS|FAIL|exit|probe" | head -60
echo "total $(( $(date +%s) - t0 ))s" >> $OUT/checks/host.txt
rm -rf $OUT/parts
cat $OUT/checks/host.txt
