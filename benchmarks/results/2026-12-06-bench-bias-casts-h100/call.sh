#!/usr/bin/env bash
# stop 32 call 3: the full pinned bench at 1ef3d11 (biases cast together) for the README
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
OUT=$OUT FREEZE=0.9 MODES=full,ckpt,slimfit,full-fp32-eager,slimfit-nopage WORKLOADS="bert-base-seqcls:170:110 bert-base-qa:200:140 vit-base:165:105" bash benchmarks/run_gpu_bench.sh > $OUT/stdout.txt 2>&1
echo "bench rc=$?"
rm -rf $OUT/parts
tail -5 $OUT/stdout.txt; grep -E "median slimfit / full|PASS|FAIL" $OUT/log.txt | head -30; ls $OUT
