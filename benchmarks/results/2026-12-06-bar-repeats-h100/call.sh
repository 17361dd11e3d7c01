#!/usr/bin/env bash
# stop 32 call 5: the head (a851c95) again, seq-cls and ViT-B paired rounds only (the host-bound pair): is the bar's pass reproducible?
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PIN=$(python3 -c 'import os; print(max(os.sched_getaffinity(0)))')
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep "Model name"; echo "pin $PIN"; } > $OUT/log.txt 2>&1
t0=$(date +%s)
for w in bert-base-seqcls vit-base; do
  PYTHONPATH=src timeout 150 taskset -c $PIN python -m slimfit.cli.bench --workload $w --mode full,slimfit,slimfit-nopage \
    --batch-size 128 --steps 20 --paired-rounds 8 --freeze-ratio 0.9 --no-png --output $OUT/$w > $OUT/$w.txt 2>&1
  echo "$w rc=$? at $(( $(date +%s) - t0 ))s: $(grep -E 'median slimfit / full|median slimfit-nopage' $OUT/$w.txt | tr '\n' ' ')" >> $OUT/log.txt
  mv $OUT/$w/bench.json $OUT/$w.json 2>/dev/null; rm -rf $OUT/$w
done
cat $OUT/log.txt; ls $OUT
