#!/usr/bin/env bash
# stop 31 call 2: GPU ops check of 9fcfd0f (C launch), pinned host profile at batch 2 and 128, seq-cls paired rounds with slimfit-resident
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
L=$OUT/log.txt
PIN=$(python3 -c 'import os; print(max(os.sched_getaffinity(0)))')
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep "Model name"; git log -1 --format=%h; echo "pin $PIN"; } >> $L 2>&1
t0=$(date +%s)
PYTHONPATH=src timeout 120 python benchmarks/ops_gpu_check.py --skip speed,models --out $OUT/ops > $OUT/ops.log 2>&1; echo "ops rc=$? at $(( $(date +%s) - t0 ))s" >> $L
grep -E "checks:|FAIL|direct" $OUT/ops.log | head -8 >> $L
rm -rf $OUT/ops
PYTHONPATH=src timeout 170 taskset -c $PIN python benchmarks/step_profile_gpu.py --workload bert-base-seqcls --mode full,freeze-only,slimfit-nopage,slimfit --batch-size 2 --freeze-ratio 0.9 --steps 30 --top 90 --out $OUT/b2 >> $L 2>&1; echo "b2 rc=$? at $(( $(date +%s) - t0 ))s" >> $L
PYTHONPATH=src timeout 120 taskset -c $PIN python benchmarks/step_profile_gpu.py --workload bert-base-seqcls --mode full,slimfit --batch-size 128 --freeze-ratio 0.9 --steps 20 --top 20 --out $OUT/b128 >> $L 2>&1; echo "b128 rc=$? at $(( $(date +%s) - t0 ))s" >> $L
OUT=$OUT/paired PAIRED=6 CAP= PROFILE= FREEZE=0.9 MODES=full,slimfit,slimfit-nopage,slimfit-resident \
  WORKLOADS="bert-base-seqcls:130:1" bash benchmarks/run_gpu_bench.sh > /dev/null 2>&1; echo "paired at $(( $(date +%s) - t0 ))s" >> $L
grep -E "paired|median|probe" $OUT/paired/log.txt >> $L
rm -f $OUT/paired/bench.png $OUT/paired/bench.md; mv $OUT/paired/bench.json $OUT/paired.json; mv $OUT/paired/log.txt $OUT/paired_log.txt; rm -rf $OUT/paired
grep -v -i warn $L | cut -c1-250 | tail -80
