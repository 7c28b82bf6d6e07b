#!/usr/bin/env bash
# The whole GPU check in one command, for a short lease of a CUDA machine (bench/GPU_CHECK.md):
#   1. kernel parity against the torch twins at realistic sizes + kernel timings, and whole BSD steps of the
#      triton backend against the reference runtime on the same GPU (bench/gpu_check.py);
#   2. `bsdgraph bench` on the triton backend: fmnist_mlp and fmnist_cnn with --compare, the Open Neuromorphic
#      shape (models/onb_bench.py) at 4096, 8192 and 16384 neurons;
#   3. real training on Fashion-MNIST with the triton backend (the demo's 2-epoch fmnist_mlp run; then the
#      8-epoch fmnist_cnn run as far as time allows), to compare with the same runs on the cpu backend.
#
#   bash bench/gpu_run.sh OUT_DIR [FASHION_MNIST_DIR]
#   GPU_RUN_PARTS="check bench" bash bench/gpu_run.sh OUT_DIR    # only some parts (default: check bench train)
#
# Each part has its own time limit and a failure does not stop the others; everything is logged to
# OUT_DIR/log.txt, bench reports go to OUT_DIR/bench.jsonl (one JSON object per line), training metrics to
# OUT_DIR/train_*.jsonl. Exit status: that of gpu_check.py (0 = every parity check passed).
set -u
out=${1:?usage: bash bench/gpu_run.sh OUT_DIR [FASHION_MNIST_DIR]}
data=${2:-/usr/share/datasets/fashion-mnist}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
parts=" ${GPU_RUN_PARTS:-check bench train} "
cd "$(dirname "$0")/.."
exec > >(tee -a "$out/log.txt") 2>&1

step() { echo; echo "=== $(date -u +%T) $*"; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda)"

check=0
if [[ $parts == *" check "* ]]; then
    step "gpu_check.py: kernel parity and timings, backend steps"
    timeout 240 python3 bench/gpu_check.py
    check=$?
    echo "gpu_check exit status $check"
fi

bench() {  # bench LIMIT_S LABEL ARGS...: one bsdgraph bench report as a JSON line tagged with LABEL
    local limit=$1 label=$2
    shift 2
    step "bench $label: $*"
    if timeout "$limit" python3 -m bsdgraph bench "$@" --json >/tmp/bench.json; then
        python3 -c "import json, sys; r = json.load(open('/tmp/bench.json')); r['label'] = sys.argv[1]
print(json.dumps(r))" "$label" | tee -a "$out/bench.jsonl"
        python3 -c "import json; from bsdgraph.tools.bench import format_report; print(format_report(json.load(open('/tmp/bench.json'))))"
    else
        echo "bench $label failed or ran past ${limit}s"
    fi
}

if [[ $parts == *" bench "* ]]; then
    bench 120 mlp models/fmnist_mlp.py --compare --steps 30 --warmup 5
    for n in 4096 8192 16384; do
        BSDGRAPH_ONB_NEURONS=$n bench 120 "onb_$n" models/onb_bench.py --batch-size 16 --compare --steps 10 --warmup 2
    done
    bench 120 cnn models/fmnist_cnn.py --compare --steps 10 --warmup 2
fi

train() {  # train LIMIT_S LABEL ARGS...: metrics of a training run on Fashion-MNIST
    local limit=$1 label=$2
    shift 2
    step "train $label: $*"
    rm -rf "/tmp/run_$label"
    timeout "$limit" python3 -m bsdgraph train "$@" --data-dir "$data" --out "/tmp/run_$label" --json
    echo "train $label exit status $?"
    cp "/tmp/run_$label/metrics.jsonl" "$out/train_$label.jsonl" 2>/dev/null
}

if [[ $parts == *" train "* ]]; then
    train 150 mlp models/fmnist_mlp.py --epochs 2
    train 300 cnn models/fmnist_cnn.py
fi
step done
exit "$check"
