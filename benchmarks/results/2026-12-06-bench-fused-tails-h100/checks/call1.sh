#!/usr/bin/env bash
# device call 1: ops check (kernels + ops) of the working tree; host cost at batch 2, base vs new, interleaved twice
set -u
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
L=$OUT/log.txt
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import torch,transformers,triton;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__)"; } >> $L 2>&1
cat $L
t0=$(date +%s)
PYTHONPATH=src timeout 240 python benchmarks/ops_gpu_check.py --skip speed,models --out $OUT > $OUT/ops.log 2>&1
echo "ops check rc=$? in $(( $(date +%s) - t0 ))s" | tee -a $L
grep -E "FAIL|residual|direct" $OUT/ops.log | head -20
grep -cE "\[ok" $OUT/ops.log
H="python benchmarks/host_rounds_gpu.py --rounds 5 --steps 10"
for i in 1 2; do
  for v in base new; do
    src=src; [ $v = base ] && src=.carry/base/src
    PYTHONPATH=$src timeout 100 $H --mode full,freeze-only,slimfit-nopage,slimfit --label $v --out /tmp/hr/b2-$v-$i 2>&1 | tail -6 | tee -a $L
  done
done
PYTHONPATH=src SLIMFIT_TRITON_LAUNCH=standard timeout 100 $H --mode full,slimfit-nopage --label new-standard-launch --out /tmp/hr/b2-std 2>&1 | tail -4 | tee -a $L
python - <<'PY'
import json, glob, os
out = {os.path.basename(os.path.dirname(p)): json.load(open(p)) for p in sorted(glob.glob('/tmp/hr/*/host_rounds.json'))}
json.dump(out, open(os.environ['OUT'] + '/host_rounds_all.json', 'w'), indent=1)
PY
echo "total $(( $(date +%s) - t0 ))s" | tee -a $L
