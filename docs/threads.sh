#!/bin/bash
# samples/s of a short fmnist_mlp training per thread setting, quiet and beside one busy process (a one-core
# Python loop); docs/experiments.md "A shared machine". Run from anywhere, on a machine with nothing else running.
cd "$(dirname "$0")/.." || exit 1
run() {
  env "$@" .venv/bin/python -m bsdgraph train models/fmnist_mlp.py --epochs 1 --limit-train 5120 --limit-test 200 \
    --out /tmp/bsdgraph_threads_run --force --json 2>/dev/null | grep -o '"samples_per_s": [0-9.]*' | cut -d' ' -f2
}
for load in quiet busy; do
  if [ "$load" = busy ]; then python3 -c "while True: pass" & BUSY=$!; sleep 1; fi
  for cfg in "BSDGRAPH_THREADS=2" "BSDGRAPH_THREADS=1" "BSDGRAPH_THREADS=2 OMP_WAIT_POLICY=PASSIVE" \
             "BSDGRAPH_THREADS=2 GOMP_SPINCOUNT=1000" "BSDGRAPH_THREADS=2 GOMP_SPINCOUNT=10000"; do
    # shellcheck disable=SC2086
    echo "$load $cfg: $(run $cfg) $(run $cfg)"
  done
  if [ "$load" = busy ]; then kill "$BUSY"; fi
done
