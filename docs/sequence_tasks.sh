#!/usr/bin/env bash
# The paper's sequence tasks (issue: character model, temporal classification, multivariate forecasting): BSD and
# BPTT on the same network, same epochs. Results: docs/experiments.md ("Sequence tasks").
# Usage: bash docs/sequence_tasks.sh OUT_DIR [SEEDS...]     (two runs at a time, one thread each; resumable: a run
#        whose metrics hold all its epochs is skipped; TASKS="mnist1d_rnn:30" runs only the tasks named)
# Then:  python docs/sequence_tasks_table.py OUT_DIR
set -euo pipefail
out=${1:?usage: sequence_tasks.sh OUT_DIR [SEEDS...]}
mkdir -p "$out"
shift
seeds=${*:-0}
export OMP_NUM_THREADS=1
# model:epochs
tasks=${TASKS:-"char_rnn:10 mnist1d_rnn:30 lorenz96_rnn:20"}
jobs=()
for seed in $seeds; do
  for task in $tasks; do
    model=${task%%:*}; epochs=${task##*:}
    for rule in bsd bptt; do
      dir="$out/${model}_${rule}_s$seed"
      [ -e "$dir/metrics.jsonl" ] && [ "$(wc -l < "$dir/metrics.jsonl")" -ge "$epochs" ] && continue
      jobs+=("$model $rule $seed $epochs $dir")
    done
  done
done
run() {
  set -- $1
  rm -rf "$5"
  echo "== $1 $2 seed $3 ($4 epochs)" >&2
  .venv/bin/bsdgraph train "models/$1.py" --rule "$2" --epochs "$4" --seed "$3" --out "$5" --json > "$5.log" 2>&1 \
    || echo "failed: $1 $2 seed $3 (see $5.log)" >&2
}
export -f run
printf '%s\n' "${jobs[@]}" | xargs -r -P 2 -I{} bash -c 'run "$@"' _ {}
