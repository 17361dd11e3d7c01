#!/usr/bin/env bash
# stop 29: the bench with valid paired rounds (configs unshared) and slimfit-resident
set -u
export PYTHONWARNINGS=ignore
{ date -u; lscpu | grep "Model name"; git log -1 --format=%h; } > $OUT/host.txt 2>&1
OUT=$OUT FREEZE=0.9 MODES=full,ckpt,slimfit,full-fp32-eager,slimfit-nopage,slimfit-resident \
  WORKLOADS="bert-base-seqcls:160:45 bert-base-qa:200:60 vit-base:160:45" bash benchmarks/run_gpu_bench.sh 2>&1 | tail -60
cat $OUT/host.txt >> $OUT/log.txt; rm $OUT/host.txt
