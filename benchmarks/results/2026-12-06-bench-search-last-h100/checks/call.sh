#!/usr/bin/env bash
# stop 30 call 2: the bench with the max-batch searches after all timings (fixed order)
set -u
export PYTHONWARNINGS=ignore
{ date -u; lscpu | grep "Model name"; git log -1 --format=%h; } > $OUT/host.txt 2>&1
OUT=$OUT FREEZE=0.9 MODES=full,ckpt,slimfit,full-fp32-eager,slimfit-nopage \
  WORKLOADS="bert-base-seqcls:180:115 bert-base-qa:210:145 vit-base:175:110" bash benchmarks/run_gpu_bench.sh 2>&1 | tail -45
cat $OUT/host.txt >> $OUT/log.txt; rm $OUT/host.txt
