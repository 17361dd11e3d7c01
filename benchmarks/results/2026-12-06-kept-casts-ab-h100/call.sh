#!/usr/bin/env bash
# stop 31 call 4: same machine, seq-cls paired rounds, code 7911af5 (old) against this tree (new), alternating
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PIN=$(python3 -c 'import os; print(max(os.sched_getaffinity(0)))')
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep "Model name"; echo "pin $PIN"; } > $OUT/log.txt 2>&1
t0=$(date +%s)
for i in 1 2; do
  for v in old new; do
    src=$PWD/src; [ $v = old ] && src=$PWD/.carry/old_src/src
    PYTHONPATH=$src timeout 75 taskset -c $PIN python -m slimfit.cli.bench --workload bert-base-seqcls --mode full,slimfit,slimfit-nopage \
      --batch-size 128 --steps 20 --paired-rounds 6 --freeze-ratio 0.9 --no-png --output $OUT/$v$i > $OUT/$v$i.txt 2>&1
    echo "$v$i rc=$? at $(( $(date +%s) - t0 ))s: $(grep -E 'median slimfit / full|median slimfit-nopage' $OUT/$v$i.txt | tr '\n' ' ')" >> $OUT/log.txt
    mv $OUT/$v$i/bench.json $OUT/$v$i.json 2>/dev/null; rm -rf $OUT/$v$i $OUT/$v$i.txt
  done
done
cat $OUT/log.txt
