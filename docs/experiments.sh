#!/usr/bin/env bash
# The open algorithm choices of the spec, measured with bsdgraph (results: docs/experiments.md).
# Usage: bash docs/experiments.sh OUT_DIR [EPOCHS] [SEEDS...]   (one run at a time, one thread each)
set -euo pipefail
out=${1:?usage: experiments.sh OUT_DIR [EPOCHS] [SEEDS...]}
epochs=${2:-5}
mkdir -p "$out"
shift $(( $# >= 2 ? 2 : 1 ))
seeds=${*:-0 1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
bsd=".venv/bin/bsdgraph train models/fmnist_mlp.py --epochs $epochs --json"
declare -A variants=(
  [default]=""
  [other_class]="--bsd negatives=other_class"
  [membrane]="--bsd distill_on=membrane"
  [poisson]="--encoding poisson"
  [vth06_default]="--lif v_th=0.6"
  [vth06_calibrated]="--lif v_th=0.6 --init calibrated"
  [bptt]="--rule bptt"
)
for seed in $seeds; do
  for name in default other_class membrane poisson vth06_default vth06_calibrated bptt; do
    dir="$out/${name}_s$seed"
    [ -e "$dir/metrics.jsonl" ] && [ "$(wc -l < "$dir/metrics.jsonl")" -ge "$epochs" ] && continue
    rm -rf "$dir"
    echo "== $name seed $seed" >&2
    $bsd --seed "$seed" --out "$dir" ${variants[$name]} > "$dir.log" 2>&1 || echo "failed: $name seed $seed" >&2
  done
done
