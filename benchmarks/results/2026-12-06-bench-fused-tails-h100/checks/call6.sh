#!/usr/bin/env bash
# device call 6: batch 128, base (HEAD 899104e) vs new (encoder mask built without reading it), seq-cls and QA
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
L=$OUT/log.txt
t0=$(date +%s)
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } >> $L 2>&1
H="python benchmarks/host_rounds_gpu.py --rounds 5 --steps 10 --batch-size 128"
for w in bert-base-seqcls bert-base-qa; do
  for v in base new; do
    src=src; [ $v = base ] && src=.carry/base/src
    PYTHONPATH=$src timeout 150 $H --workload $w --mode full,slimfit,slimfit-nopage --label $v --out /tmp/hr/$w-$v 2>&1 | tail -4 | tee -a $L
  done
done
python - <<'PY'
import json, glob, os
out = {os.path.basename(os.path.dirname(p)): json.load(open(p)) for p in sorted(glob.glob('/tmp/hr/*/host_rounds.json'))}
json.dump(out, open(os.environ['OUT'] + '/host_rounds_mask.json', 'w'), indent=1)
PY
echo "total $(( $(date +%s) - t0 ))s" | tee -a $L
