#!/usr/bin/env bash
# stop 32 call 2: GPU op checks of the biases cast together; seq-cls paired rounds alternating old (7d4d1f9) / new / new with paging on the compute stream
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PIN=$(python3 -c 'import os; print(max(os.sched_getaffinity(0)))')
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep "Model name"; echo "pin $PIN"; } > $OUT/log.txt 2>&1
t0=$(date +%s)
PYTHONPATH=src timeout 150 python benchmarks/ops_gpu_check.py --skip speed,models --out $OUT/ops > $OUT/ops_log.txt 2>&1; echo "ops rc=$? at $(( $(date +%s) - t0 ))s" >> $OUT/log.txt
rm -rf $OUT/ops
for i in 1 2; do
  for v in old new news0; do
    src=$PWD/src; [ $v = old ] && src=$PWD/.carry/old_src/src
    S0=1; [ $v = news0 ] && S0=0
    SLIMFIT_PAGING_STREAM=$S0 PYTHONPATH=$src timeout 80 taskset -c $PIN python -m slimfit.cli.bench --workload bert-base-seqcls --mode full,slimfit,slimfit-nopage \
      --batch-size 128 --steps 20 --paired-rounds 5 --freeze-ratio 0.9 --no-png --output $OUT/$v$i > $OUT/$v$i.txt 2>&1
    echo "$v$i rc=$? at $(( $(date +%s) - t0 ))s: $(grep -E 'median slimfit / full|median slimfit-nopage' $OUT/$v$i.txt | tr '\n' ' ')" >> $OUT/log.txt
    mv $OUT/$v$i/bench.json $OUT/$v$i.json 2>/dev/null; rm -rf $OUT/$v$i $OUT/$v$i.txt
  done
done
grep -E "checks:|FAIL|bit for bit" $OUT/ops_log.txt | head; cat $OUT/log.txt; ls $OUT
