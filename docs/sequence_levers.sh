#!/usr/bin/env bash
# What was tried to close BSD's gap on the sequence tasks (docs/experiments.md, "Sequence tasks"): each lever alone,
# BSD only, seed 0, the model's own schedule (char_rnn: 5 epochs). Two runs at a time, one thread each; resumable.
# Usage: bash docs/sequence_levers.sh OUT_DIR     then: python docs/sequence_tasks_table.py OUT_DIR
set -euo pipefail
out=${1:?usage: sequence_levers.sh OUT_DIR}
mkdir -p "$out"
export OMP_NUM_THREADS=1
# The first levers were measured with step credit (each model's default then): they pin it, so that a model file
# whose default is now through_time (mnist1d_rnn) still runs them as measured.
step="--bsd recurrent_credit=step"
declare -A levers=([membrane]="$step --bsd distill_on=membrane" [lam0.2]="$step --bsd lam=0.2"
                   [lr5e-4]="$step --lr 5e-4" [steprows]="$step --bsd reco_rows=step" [step]="$step"
                   [through_time]="--bsd recurrent_credit=through_time")
jobs=()
for task in mnist1d_rnn:30 lorenz96_rnn:20 char_rnn:5; do
  model=${task%%:*}; epochs=${task##*:}
  for lever in "${!levers[@]}"; do
    dir="$out/${model}_bsd-${lever}_s0"
    [ -e "$dir/metrics.jsonl" ] && [ "$(wc -l < "$dir/metrics.jsonl")" -ge "$epochs" ] && continue
    jobs+=("$model|$epochs|$dir|${levers[$lever]}")
  done
done
run() {
  IFS='|' read -r model epochs dir flags <<< "$1"
  rm -rf "$dir"
  echo "== $model $flags" >&2
  .venv/bin/bsdgraph train "models/$model.py" --epochs "$epochs" --seed 0 --out "$dir" --json $flags \
    > "$dir.log" 2>&1 || echo "failed: $model $flags (see $dir.log)" >&2
}
export -f run
printf '%s\n' "${jobs[@]}" | xargs -r -P 2 -I{} bash -c 'run "$@"' _ {}
