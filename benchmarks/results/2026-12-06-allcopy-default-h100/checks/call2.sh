#!/usr/bin/env bash
# stop 27 call 2: pager host cost (base = HEAD 1730d16 src, new = packed moments), and
# interleaved batch-128 rounds base vs new (new: frozen_weight_copy="all" default + packed pager)
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
L=$OUT/log.txt
t0=$(date +%s)
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } >> $L 2>&1
P="python benchmarks/paging_host_cost.py --device cuda --shapes bert-base --change 0.22 --hold 2 --calls 100 --repeats 5"
for v in base new base new; do
  src=src; [ $v = base ] && src=.carry/base/src
  echo "== pager $v" >> $OUT/paging_host_cost.txt
  PYTHONPATH=$src timeout 120 $P >> $OUT/paging_host_cost.txt 2>&1
done
grep -A2 "== pager" $OUT/paging_host_cost.txt | grep -v "^units" | tee -a $L
H="python benchmarks/host_rounds_gpu.py --rounds 5 --steps 10 --batch-size 128"
for w in bert-base-seqcls vit-base; do
  for v in base new; do
    src=src; m=full,slimfit,slimfit-nopage,slimfit-projcopy
    [ $v = base ] && src=.carry/base/src && m=full,slimfit,slimfit-nopage
    PYTHONPATH=$src timeout 150 $H --workload $w --mode $m --label $v --out /tmp/hr/$w-$v 2>&1 | tail -5 | tee -a $L
  done
done
python - <<'PY'
import json, glob, os
out = {os.path.basename(os.path.dirname(p)): json.load(open(p)) for p in sorted(glob.glob('/tmp/hr/*/host_rounds.json'))}
json.dump(out, open(os.environ['OUT'] + '/host_rounds_b128.json', 'w'), indent=1)
PY
PYTHONPATH=src timeout 150 python benchmarks/step_profile_gpu.py --workload bert-base-seqcls --mode slimfit,slimfit-nopage --freeze-ratio 0.9 --steps 20 --top 60 --out $OUT/sp > $OUT/step_profile.txt 2>&1
head -3 $OUT/step_profile.txt | tee -a $L
echo "total $(( $(date +%s) - t0 ))s" | tee -a $L
