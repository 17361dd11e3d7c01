#!/usr/bin/env bash
# stop 27 call 6: GPU ops check of the committed code (new default frozen_weight_copy="all", _row_tile), then
# interleaved batch-128 rounds of seq-cls and ViT-B with the new defaults (text batches without a mask)
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
L=$OUT/log.txt
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } >> $L 2>&1
t0=$(date +%s)
PYTHONPATH=src timeout 150 python benchmarks/ops_gpu_check.py --skip speed,models --out $OUT > $OUT/ops.log 2>&1
echo "ops check rc=$? in $(( $(date +%s) - t0 ))s; ok $(grep -cE '\[ok' $OUT/ops.log)" | tee -a $L
grep -E "FAIL|bytes per layer" $OUT/ops.log | head -10 | tee -a $L
for w in bert-base-seqcls vit-base; do
  PYTHONPATH=src timeout 100 python benchmarks/host_rounds_gpu.py --rounds 5 --steps 10 --batch-size 128 --workload $w --mode full,slimfit,slimfit-nopage --out /tmp/hr/$w 2>&1 | tail -4 | tee -a $L
done
python - <<'PY'
import json, glob, os
out = {os.path.basename(os.path.dirname(p)): json.load(open(p)) for p in sorted(glob.glob('/tmp/hr/*/host_rounds.json'))}
json.dump(out, open(os.environ['OUT'] + '/host_rounds_b128.json', 'w'), indent=1)
PY
echo "total $(( $(date +%s) - t0 ))s" | tee -a $L
