#!/usr/bin/env bash
# The CounterFact and null-space benchmarks (docs/benchmarks.md) on one GPU, in one go, from the repository root:
#
#   bench/gpu_suite.sh OUTPUT [SECONDS]      # SECONDS: stop everything by then (default: no limit)
#
# 1. Alone, so that their times are their own: the quick benchmark (N = 100, B = 10), MEMIT
#    and AlphaEdit in float32, and the N = 30 CounterFact setting (statistics from 2,000
#    texts, as on the CPU, and from the whole corpus).
# 2. Then side by side on the same GPU, PARALLEL runs at a time (default 4; their figures are
#    their own, their times are not): AlphaEdit with bf16 weights (precision: bf16-true) at
#    N = 100; the long run (N = 1000, B = 100, value optimization in passes of 25 requests)
#    for MEMIT and AlphaEdit; the null-space rules at N = 300, B = 30.
#
# Needs the package installed (pip install -e .) and ../shared/data. Every run is
# `bench/sequential.py` on bench/smollm2-counterfact30.yaml with the logger off
# (no W&B needed on the node), no export and no checkpoints; each writes its summary under
# OUTPUT, its log under OUTPUT/logs.
set -u
out=${1:?usage: bench/gpu_suite.sh OUTPUT [SECONDS]}
limit=${2:-1000000000}
started=$(date +%s)
mkdir -p "$out/logs"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

parallel=${PARALLEL:-4}
throttle() { while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n; done; }

left() { echo $(( limit - ($(date +%s) - started) )); }

run() {  # run NAME N B EPOCH METHODS... -- OVERRIDES...
    local name=$1 n=$2 b=$3 epoch=$4; shift 4
    local methods=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do methods+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    local seconds; seconds=$(left)
    if [ "$seconds" -le 10 ]; then echo "$name: skipped, out of time"; return; fi
    echo "$(date +%T) start $name"
    timeout "$seconds" "${PYTHON:-python3}" bench/sequential.py --n "$n" --batch "$b" --epoch "$epoch" \
        --methods "${methods[@]}" --output "$out/$name" -- --trainer.logger false \
        --export.enabled false --checkpoint.enabled false "$@" \
        > "$out/logs/$name.log" 2>&1
    local status=$?
    echo "$(date +%T) end   $name: exit $status"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 1. alone
run quick 100 10 20 memit alphaedit
run n30 30 10 30 memit alphaedit
run n30-whole-corpus 30 10 30 alphaedit -- --edit.statistics.sample_count 100000

# 2. side by side
long=(--model.values.requests_per_pass 25)
throttle; run bf16 100 10 20 alphaedit -- --trainer.precision bf16-true &
throttle; run long-alphaedit 1000 100 200 alphaedit -- "${long[@]}" &
throttle; run long-memit 1000 100 200 memit -- "${long[@]}" &
throttle; run rules-memit 300 30 60 memit &
for rule in absolute:0.02 absolute:0.01 absolute:0.05 relative:0.01 relative:0.03 \
            energy:0.1 energy:0.3 fraction:0.5 fraction:0.7 fraction:0.9; do
    throttle
    run "rules-${rule/:/-}" 300 30 60 alphaedit -- \
        --edit.nullspace_rule "${rule%%:*}" --edit.nullspace_threshold "${rule##*:}" &
done
wait
echo "suite done in $(( $(date +%s) - started )) s"
