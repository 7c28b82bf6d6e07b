#!/usr/bin/env bash
# Regenerates the CPU figures of bench/RESULTS.md on an otherwise idle machine (writes into bench/out/).
# Usage: bash bench/run_results.sh [CHECKPOINT_OF_fmnist_mlp]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
bs=.venv/bin/bsdgraph
{ nproc; lscpu | grep -E "Model name|^CPU\(s\)" || true; .venv/bin/python -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"; } > bench/out/machine.txt
for i in 1 2 3; do $bs bench models/fmnist_mlp.py --compare --steps 20 > "bench/out/compare_$i.txt" 2>&1; done
.venv/bin/python bench/passes.py --steps 20 > bench/out/passes.txt 2>&1
$bs bench models/fmnist_mlp.py --sweep T=1,2,4,8,16 --steps 5 --plot bench/sweep_T.png > bench/out/sweep_T.txt 2>&1
$bs bench models/fmnist_mlp.py --sweep width=128,256,512,1024,2048 --steps 5 --plot bench/sweep_width.png > bench/out/sweep_width.txt 2>&1
$bs bench models/fmnist_mlp.py --sweep batch=16,32,64,128,256 --steps 5 --plot bench/sweep_batch.png > bench/out/sweep_batch.txt 2>&1
if [ -n "${1:-}" ]; then $bs bench models/fmnist_mlp.py --energy --checkpoint "$1" > bench/out/energy_mlp.txt 2>&1; fi
