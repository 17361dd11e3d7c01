#!/usr/bin/env bash
# Text accuracy on one GPU in one call: the parity grid of benchmarks/accuracy.py on the
# offline tasks (pretrained MiniLM-L6, 3 seeds). The model travels as fp16 safetensors (the
# 64 MiB carry limit) and is upcast to an fp32 folder here first. Run from the repo root:
#   bash benchmarks/text_accuracy_gpu.sh      (carry .carry/minilm and .carry/data)
# Knobs (environment): OUT, TASKS ("trec sentiment"), GRID (parity), VARIANTS, SEEDS,
# WORKERS, EPOCHS, DEVICE.
set -u -o pipefail
OUT="${OUT:-runs/text-accuracy}"
TASKS="${TASKS:-trec sentiment}"
GRID="${GRID:-parity}"
VARIANTS="${VARIANTS:-}"
SEEDS="${SEEDS:-0,1,2}"
WORKERS="${WORKERS:-14}"
EPOCHS="${EPOCHS:-3}"
DEVICE="${DEVICE:-cuda}"
SRC="${SRC:-.carry/minilm}"
DATA="${DATA:-.carry/data}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
export PYTHONWARNINGS=ignore::FutureWarning OMP_NUM_THREADS=1
mkdir -p "$OUT"
MODEL="$OUT/minilm-fp32"
"$PYTHON" - "$SRC" "$MODEL" <<'PY'
import shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.suffix == ".safetensors":
        tensors = {k: v.to(torch.float32) for k, v in load_file(str(f)).items()}
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    else:
        shutil.copy(f, dst / f.name)
print("fp32 model in", dst)
PY
for task in $TASKS; do
  "$PYTHON" benchmarks/accuracy.py --task "$task" --model "$MODEL" --data-dir "$DATA" \
    --grid "$GRID" ${VARIANTS:+--variants "$VARIANTS"} --seeds "$SEEDS" --epochs "$EPOCHS" \
    --workers "$WORKERS" --device "$DEVICE" --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
done
rm -rf "$MODEL"
