#!/usr/bin/env bash
# stop 32 call 1: GPU op checks of 7d4d1f9 (kept casts), then seq-cls traces: slimfit vs slimfit-nopage vs side stream off
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PIN=$(python3 -c 'import os; print(max(os.sched_getaffinity(0)))')
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep "Model name"; echo "pin $PIN"; } > $OUT/log.txt 2>&1
t0=$(date +%s)
PYTHONPATH=src timeout 150 python benchmarks/ops_gpu_check.py --skip speed,models --out $OUT/ops > $OUT/ops_log.txt 2>&1; echo "ops rc=$? at $(( $(date +%s) - t0 ))s" >> $OUT/log.txt
rm -rf $OUT/ops
P="python benchmarks/step_profile_gpu.py --workload bert-base-seqcls --freeze-ratio 0.9 --steps 30 --top 30"
PYTHONPATH=src timeout 150 taskset -c $PIN $P --mode slimfit-nopage,slimfit --trace --out $OUT > $OUT/prof.txt 2>&1; echo "prof rc=$? at $(( $(date +%s) - t0 ))s" >> $OUT/log.txt
SLIMFIT_PAGING_STREAM=0 PYTHONPATH=src timeout 100 taskset -c $PIN $P --mode slimfit --trace --out $OUT/s0 > $OUT/prof_s0.txt 2>&1; echo "prof s0 rc=$? at $(( $(date +%s) - t0 ))s" >> $OUT/log.txt
mv $OUT/s0/trace-bert-base-seqcls-slimfit.json.gz $OUT/trace-s0-slimfit.json.gz; mv $OUT/s0/step_profile.json $OUT/step_profile_s0.json; rm -rf $OUT/s0
PYTHONPATH=src timeout 100 taskset -c $PIN $P --mode slimfit-nopage,slimfit,slimfit-nopage,slimfit --batch-size 2 --out $OUT/b2 > $OUT/b2.txt 2>&1; echo "b2 rc=$? at $(( $(date +%s) - t0 ))s" >> $OUT/log.txt
grep -E "b2b" $OUT/b2.txt >> $OUT/log.txt; rm -rf $OUT/b2 $OUT/b2.txt
grep -E "checks:|FAIL|kept frozen" $OUT/ops_log.txt | head; cat $OUT/log.txt; grep b2b $OUT/prof.txt $OUT/prof_s0.txt; ls -la $OUT
