#!/usr/bin/env bash
# stop 30 call 3: GPU ops check (the backward's autocast region changed) + a host-speed probe
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep "Model name"; } > $OUT/log.txt 2>&1
python - >> $OUT/log.txt 2>&1 <<'PY'
import timeit
f = lambda: sum(i * i for i in range(1000))
print("host probe: sum of squares 1000, us per call (5 repeats):", [round(t / 2000 * 1e6, 1) for t in timeit.repeat(f, number=2000, repeat=5)])
PY
PYTHONPATH=src timeout 300 python benchmarks/ops_gpu_check.py --skip speed,models --out $OUT > $OUT/ops.log 2>&1; echo "ops rc=$?" >> $OUT/log.txt
grep -iE "fail|error|pass|checks" $OUT/ops.log | tail -15; cat $OUT/log.txt
