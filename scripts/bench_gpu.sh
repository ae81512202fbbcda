#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md#gpu in one go, on the first CUDA device:
#   1. the CUDA-only tests (graph against eager updates, device replay on CUDA);
#   2. scripts/bench.py with ours eager and as CUDA graphs beside torchrl: float32, bf16,
#      float32 with torch.compile (ours: agent.compile; torchrl: its loss modules), and compiled
#      with bf16 (torchrl as its Dreamer script ships);
#   3. the training loop end to end (graphed updates, replay on the GPU) with 1, 4 and 8 EGL envs.
# Every step runs even if an earlier one fails; the exit status says whether all passed.
#
#   bash scripts/bench_gpu.sh [results dir, default docs/results]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/results}"
mkdir -p "$out"
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember failures
    local name="$1"
    shift
    echo "== $name: $*"
    if ! "$@" 2>&1 | tee "$out/$name.log"; then
        failed+=("$name")
    fi
}

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
step gpu_tests python -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_replay.py \
    tests/envs/test_imagination.py tests/agents/test_planner.py
step bench_cuda python scripts/bench.py --device cuda --graph --reps 20 --skip-e2e \
    --out "$out/bench_cuda.json"
step bench_cuda_bf16 python scripts/bench.py --device cuda --graph --autocast bf16 --reps 20 \
    --skip-e2e --out "$out/bench_cuda_bf16.json"
step bench_cuda_compile python scripts/bench.py --device cuda --graph --compile --reps 20 \
    --skip-e2e --out "$out/bench_cuda_compile.json"
# torchrl as its Dreamer script ships (compiled actor / value losses, bf16 autocast)
step bench_cuda_compile_bf16 python scripts/bench.py --device cuda --graph --compile \
    --autocast bf16 --reps 20 --skip-e2e --out "$out/bench_cuda_compile_bf16.json"
for n in 1 4 8; do
    step "e2e_cuda_envs$n" python scripts/bench.py --device cuda --only-e2e --graph \
        --replay-storage device --num-envs "$n" --e2e-steps 256 --out "$out/e2e_cuda_envs$n.json"
done

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
echo "all GPU measurements written to $out"
