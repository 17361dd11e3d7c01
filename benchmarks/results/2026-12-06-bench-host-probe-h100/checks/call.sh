#!/usr/bin/env bash
# stop 30 call 4: the bench again (no max-batch searches, 10 paired rounds) with the host-speed probe
set -u
export PYTHONWARNINGS=ignore
{ date -u; lscpu | grep "Model name"; } > $OUT/host.txt 2>&1
OUT=$OUT PAIRED=10 CAP= FREEZE=0.9 MODES=full,ckpt,slimfit,full-fp32-eager,slimfit-nopage \
  WORKLOADS="bert-base-seqcls:150:1 bert-base-qa:190:1 vit-base:150:1" bash benchmarks/run_gpu_bench.sh 2>&1 | tail -40
cat $OUT/host.txt >> $OUT/log.txt; rm $OUT/host.txt
