#!/usr/bin/env bash
# The energy table of bench/RESULTS.md: `bsdgraph bench --energy` for every trained model (firing rates measured on
# each model's test data with its checkpoint). Usage: bash bench/energy_all.sh MODEL=CHECKPOINT ...
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
for pair in "$@"; do
  model=${pair%%=*}; ck=${pair#*=}
  name=$(basename "$model" .py)
  echo "== $name ($ck)"
  .venv/bin/bsdgraph bench "$model" --energy --checkpoint "$ck" --threads 1 | tee "bench/out/energy_$name.txt"
done
