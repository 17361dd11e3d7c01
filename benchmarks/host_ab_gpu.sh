#!/usr/bin/env bash
# Host cost of the working tree against a base commit, in one GPU call (issue 4).
# Host-bound step times on the device machine move by up to 2x between runs, so the two
# versions are measured in the same call, interleaved (base, new, base, new).
#   BASE=<git ref> OUT=... bash benchmarks/host_ab_gpu.sh
# Knobs: BASE (default HEAD, i.e. the working tree's uncommitted changes are "new"),
# BASE_SRC (a folder holding the base's src/, e.g. carried, when the device's .git lacks
# BASE), WORKLOAD (bert-base-seqcls), MODES (full,slimfit-nopage), ROUNDS (2), HOST (1: also
# benchmarks/host_overhead_gpu.py; 0: the step profiles only).
set -u -o pipefail
BASE="${BASE:-HEAD}"
OUT="${OUT:-runs/host-ab}"
WORKLOAD="${WORKLOAD:-bert-base-seqcls}"
MODES="${MODES:-full,slimfit-nopage}"
ROUNDS="${ROUNDS:-2}"
HOST="${HOST:-1}"
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
base_dir="$(mktemp -d)"
if [ -n "${BASE_SRC:-}" ]; then
  cp -r "$BASE_SRC/src" "$base_dir/src"
  echo "base: $BASE_SRC, new: working tree"
else
  git archive "$BASE" src | tar -x -C "$base_dir"
  echo "base: $(git rev-parse --short "$BASE"), new: working tree ($(git status --short src | wc -l) changed files under src)"
fi
for round in $(seq "$ROUNDS"); do
  for v in base new; do
    src="$PWD/src"
    [ "$v" = base ] && src="$base_dir/src"
    echo "== round $round: $v"
    if [ "$HOST" = 1 ]; then
      PYTHONPATH="$src" python benchmarks/host_overhead_gpu.py --out "$OUT/host-$v-$round" 2>&1 | tail -20
    fi
    PYTHONPATH="$src" python benchmarks/step_profile_gpu.py --workload "$WORKLOAD" --mode "$MODES" \
      --out "$OUT/profile-$v-$round" 2>&1 | grep -E " b2b | self " | head -24
  done
done
rm -rf "$base_dir"
