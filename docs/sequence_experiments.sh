#!/usr/bin/env bash
# Mackey-Glass one-step-ahead prediction, BSD vs BPTT on the same recurrent network (results: docs/experiments.md).
# Usage: bash docs/sequence_experiments.sh OUT_DIR [EPOCHS] [SEEDS...]   (one run at a time, one thread each)
# Then: python docs/sequence_table.py OUT_DIR
set -euo pipefail
out=${1:?usage: sequence_experiments.sh OUT_DIR [EPOCHS] [SEEDS...]}
epochs=${2:-30}
mkdir -p "$out"
shift $(( $# >= 2 ? 2 : 1 ))
seeds=${*:-0 1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
declare -A variants=([bsd]="" [bsd_membrane]="--bsd distill_on=membrane" [bptt]="--rule bptt")
for seed in $seeds; do
  for model in mackey_glass_rnn mackey_glass_seq2seq; do
    for name in bsd bsd_membrane bptt; do
      dir="$out/${model}_${name}_s$seed"
      [ -e "$dir/metrics.jsonl" ] && [ "$(wc -l < "$dir/metrics.jsonl")" -ge "$epochs" ] && continue
      rm -rf "$dir"
      echo "== $model $name seed $seed" >&2
      .venv/bin/bsdgraph train "models/$model.py" --epochs "$epochs" --seed "$seed" --out "$dir" --json \
        ${variants[$name]} > "$dir.log" 2>&1 || echo "failed: $model $name seed $seed" >&2
    done
  done
done
