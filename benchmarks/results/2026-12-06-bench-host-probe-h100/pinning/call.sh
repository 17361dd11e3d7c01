#!/usr/bin/env bash
# stop 30 call 5: is the host's slow state steal time or clock? seq-cls rounds, plain and pinned to one core
set -u
export PYTHONWARNINGS=ignore
( while true; do echo "$(date +%s.%N | cut -c1-14) $(head -1 /proc/stat) mhz $(grep MHz /proc/cpuinfo | awk '{s+=$4; if ($4<m||m==0) m=$4; if ($4>x) x=$4} END {printf "%.0f %.0f %.0f", s/NR, m, x}')"; sleep 1; done ) > $OUT/stat.txt 2>&1 &
S=$!
{ nproc; lscpu | grep -E "Model name|Thread|Core|Socket|NUMA|MHz|Hypervisor"; } > $OUT/log.txt 2>&1
for v in plain pinned; do
  pre=""; [ $v = pinned ] && pre="taskset -c 5"
  echo "== $v at $(date +%s)" >> $OUT/log.txt
  OUT=$OUT/$v PAIRED=8 CAP= FREEZE=0.9 MODES=full,slimfit,slimfit-nopage \
    WORKLOADS="bert-base-seqcls:110:1" $pre bash benchmarks/run_gpu_bench.sh 2>&1 | grep -E "paired|probe|median|exit" >> $OUT/log.txt
  rm -f $OUT/$v/bench.* $OUT/$v/log.txt
done
echo "== end at $(date +%s)" >> $OUT/log.txt
kill $S
cat $OUT/log.txt
