#!/bin/bash
# Everything a lent GPU is for, in one call of a few minutes (device time is scarce):
#   1. benchmarks/decode.py on the 1.1B TinyLlama shape, with gpu_anchor.py's torch
#      baseline (ceilings + static-cache Llama, eager and torch.compile) in the same call;
#   2. the tests that mean more on a GPU, natively: CUDA-graph capture and replay, and
#      every gemm tile candidate the timing may pick;
#   3. benchmarks/decode.py on the SmolLM2 shape (ANCHORS.md's torch.compile figure is the peer).
# Run from the checkout's root with gpu_anchor.py copied to .anchor/ (git-ignored, carried):
#   device run: bash benchmarks/gpu_session.sh   (carry [".anchor"])
# Logs go to $OUT (default ./gpu-out); each stage has its own time limit, so a failing or
# slow stage does not take the later ones with it.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 seconds=$2
    shift 2
    echo "== $name ($(date +%T), limit ${seconds}s)"
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name exit $? ($(date +%T))"
}

stage decode_tinyllama 240 python3 benchmarks/decode.py --target cuda --shape tinyllama --anchor .anchor/gpu_anchor.py
stage tests 170 python3 -m pytest -q -x -p no:cacheprovider -p no:logging --durations=8 tests/test_cuda_graphs.py tests/test_gemm_tiles.py
tail -n 25 "$OUT/tests.log"
stage decode_smollm2 100 python3 benchmarks/decode.py --target cuda --shape smollm2 --no-anchor
for name in decode_tinyllama decode_smollm2; do
    echo "== $name"
    grep -v -E "^(DEBUG|W[0-9]|I[0-9])" "$OUT/$name.log" | grep -v "tuned tile" | tail -n 45
done
