#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md#gpu, on the first CUDA device, in two stages
# sized for the device time a session gets (15 minutes, 10 per command):
#   quick (the default, ~10 minutes): the libraries load; the CUDA-only tests (graph against
#     eager updates in float32, bf16 and compiled, device replay on CUDA); scripts/bench.py
#     --quick with ours eager and as CUDA graphs beside torchrl in float32; the training loop
#     end to end (graphed updates, replay on the GPU, one EGL env) beside torchrl's loop.
#   full (a second session): bench.py with 20 reps in float32, bf16, compiled, and compiled with
#     bf16 (torchrl as its Dreamer script ships), and the loop with 1, 4 and 8 EGL envs.
# Every step runs even if an earlier one fails; the exit status says whether all passed.
#
#   bash scripts/bench_gpu.sh [results dir, default docs/results] [quick|full]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/results}"
stage="${2:-quick}"
case "$stage" in quick | full) ;; *) echo "stage must be quick or full, got $stage" >&2; exit 2 ;; esac
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
if [[ "$stage" == quick ]]; then
    step imports python -c "import torch, torchrl, tensordict, dm_control, mujoco, triton; \
print(torch.__version__, torch.cuda.get_device_name())"
    step gpu_tests python -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py \
        tests/test_replay.py tests/envs/test_imagination.py tests/agents/test_planner.py
    step bench_cuda_quick python scripts/bench.py --device cuda --graph --quick --skip-e2e \
        --out "$out/bench_cuda_quick.json"
    step e2e_cuda_envs1 python scripts/bench.py --device cuda --only-e2e --graph \
        --replay-storage device --e2e-steps 64 --out "$out/e2e_cuda_envs1.json"
else
    step bench_cuda python scripts/bench.py --device cuda --graph --reps 20 --skip-e2e \
        --out "$out/bench_cuda.json"
    step bench_cuda_bf16 python scripts/bench.py --device cuda --graph --autocast bf16 \
        --reps 20 --skip-e2e --out "$out/bench_cuda_bf16.json"
    step bench_cuda_compile python scripts/bench.py --device cuda --graph --compile --reps 20 \
        --skip-e2e --out "$out/bench_cuda_compile.json"
    # torchrl as its Dreamer script ships (compiled actor / value losses, bf16 autocast)
    step bench_cuda_compile_bf16 python scripts/bench.py --device cuda --graph --compile \
        --autocast bf16 --reps 20 --skip-e2e --out "$out/bench_cuda_compile_bf16.json"
    for n in 1 4 8; do  # torchrl's loop once, beside the first
        peer=()
        ((n > 1)) && peer=(--skip-e2e-torchrl)
        step "e2e_cuda_envs$n" python scripts/bench.py --device cuda --only-e2e --graph \
            --replay-storage device --num-envs "$n" --e2e-steps 256 "${peer[@]}" \
            --out "$out/e2e_cuda_envs$n.json"
    done
fi

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
echo "all GPU measurements written to $out"
