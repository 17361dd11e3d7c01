#!/usr/bin/env bash
# stop 27 call 4: the bench (README table) with the new defaults, then the mask read on seq-cls on the same machine
set -u
OUT=$OUT FREEZE=0.9 MODES=full,ckpt,slimfit,full-fp32-eager,freeze-only,slimfit-nopage,slimfit-projcopy \
  WORKLOADS="bert-base-seqcls:150:45 bert-base-qa:195:60 vit-base:150:45" bash benchmarks/run_gpu_bench.sh > /dev/null 2>&1
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
PYTHONPATH=src timeout 100 python benchmarks/mask_sync_gpu.py --workload bert-base-seqcls --mode full,slimfit --rounds 5 --steps 10 --out $OUT/mask 2>&1 | tail -9 | tee -a $OUT/log.txt
