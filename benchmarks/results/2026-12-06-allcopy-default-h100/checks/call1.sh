#!/usr/bin/env bash
# stop 27 call 1: where slimfit's paging time goes on seq-cls (profile), and interleaved rounds of allcopy/nopage
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
L=$OUT/log.txt
t0=$(date +%s)
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; } >> $L 2>&1
PYTHONPATH=src timeout 200 python benchmarks/step_profile_gpu.py --workload bert-base-seqcls --mode full,slimfit,slimfit-nopage,slimfit-allcopy --freeze-ratio 0.9 --steps 20 --top 60 --out $OUT/sp > $OUT/step_profile.txt 2>&1
tail -5 $OUT/step_profile.txt >> $L
for w in bert-base-seqcls vit-base; do
PYTHONPATH=src timeout 150 python benchmarks/host_rounds_gpu.py --rounds 6 --steps 10 --batch-size 128 --workload $w --mode full,slimfit,slimfit-allcopy,slimfit-nopage --out /tmp/hr/$w 2>&1 | tail -7 | tee -a $L
done
python - <<'PY'
import json, glob, os
out = {os.path.basename(os.path.dirname(p)): json.load(open(p)) for p in sorted(glob.glob('/tmp/hr/*/host_rounds.json'))}
json.dump(out, open(os.environ['OUT'] + '/host_rounds_b128.json', 'w'), indent=1)
PY
echo "total $(( $(date +%s) - t0 ))s" | tee -a $L
