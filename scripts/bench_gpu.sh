#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md#gpu on the first CUDA device, in stages that each
# fit one device-tool command (10 minutes; a session has 15 minutes of device time in all):
#   quick (the default, ~6-8 minutes): the libraries load; the CUDA-only tests (graph against
#     eager updates in float32, bf16, compiled and with repval_grad; device replay; the reuse env,
#     the planner, seeding and devices on CUDA); bench.py --quick with ours eager and as CUDA
#     graphs beside torchrl in float32; the training loop end to end (graphed updates, replay on
#     the GPU, one EGL env) beside torchrl's loop.
#   full: bench.py with 10 reps in float32 and in bf16.
#   compile: bench.py --quick compiled, and compiled with bf16 (torchrl as its Dreamer script
#     ships: compiled actor / value losses, bf16 autocast).
#   e2e: the loop with 1, 4 and 8 EGL envs.
# Every step runs under its own time limit even if an earlier one fails; the exit status says
# whether all passed.
#
# On the device tool's machine (docs/benchmarks.md#gpu): run `bash scripts/gpu_carry.sh` here
# once, then call the tool with carry [".whl", ".gl"], timeout_s 600 and the command
#   AEFRL_DEVICE_TOOL=1 AEFRL_GIT_COMMIT=<git describe --always --dirty> bash scripts/bench_gpu.sh quick
# There the wheels in .whl/ are installed to /tmp/site and the EGL loaders in .gl/
# unpacked into /, and the results go to a folder of their own and come back as one archive,
# $OUT/gpu_<stage>.tgz (the tool returns at most 8 files) with the log of every step. Elsewhere
# (a GPU workstation) it uses the installed packages and writes to docs/results. Every step
# ends within AEFRL_GPU_SECONDS (540) of the start, under the tool's 600.
#
#   bash scripts/bench_gpu.sh [results dir, default $OUT's archive or docs/results] [stage]
#   bash scripts/bench_gpu.sh [stage]
set -uo pipefail
cd "$(dirname "$0")/.."
is_stage() { case "$1" in quick | full | compile | e2e) return 0 ;; *) return 1 ;; esac; }
if (($# == 1)) && is_stage "$1"; then set -- "" "$1"; fi  # a stage given alone
stage="${2:-quick}"
if ! is_stage "$stage"; then
    echo "stage must be quick, full, compile or e2e, got $stage" >&2
    exit 2
fi
seconds="${AEFRL_GPU_SECONDS:-540}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
    echo "AEFRL_GPU_SECONDS must be whole seconds, got $seconds" >&2
    exit 2
fi
# The device tool's machine (AEFRL_DEVICE_TOOL=1, and its $OUT): the loaders are unpacked into
# / and the wheels installed beside the image's packages, which a workstation must not get.
device_tool=false
[[ "${AEFRL_DEVICE_TOOL:-}" == 1 && -n "${OUT:-}" ]] && device_tool=true
if [[ -n "${1:-}" ]]; then out="$1"; elif $device_tool; then out=$(mktemp -d); else out=docs/results; fi
if $device_tool && [[ -d "$out" && "$out" -ef "$OUT" ]]; then
    echo "the results folder must not be \$OUT, which gets their archive: leave it \"\"" >&2
    exit 2
fi
# A command the tool stops at its limit is killed whole, traps included: every step ends by this
# deadline, and the archive is rewritten after each.
deadline=$((SECONDS + seconds))
mkdir -p "$out"
PY="${PYTHON:-python3}"  # the device image's python3 is the one with CUDA torch
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

pack() {  # the results so far as one archive under $OUT
    if $device_tool; then
        local tmp="$OUT/gpu_$stage.tgz.tmp"
        { tar czf "$tmp" -C "$out" . && mv "$tmp" "$OUT/gpu_$stage.tgz"; } || rm -f "$tmp"
    fi
}
trap pack EXIT

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
if $device_tool && [[ -d .gl ]] && compgen -G ".gl/*.deb" >/dev/null; then  # EGL, Vulkan
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
    nvidia=/usr/local/nvidia/share
    [[ -f $nvidia/glvnd/egl_vendor.d/10_nvidia.json ]] &&
        export __EGL_VENDOR_LIBRARY_FILENAMES=$nvidia/glvnd/egl_vendor.d/10_nvidia.json
    [[ -f $nvidia/vulkan/icd.d/nvidia_icd.json ]] &&
        export VK_DRIVER_FILES=$nvidia/vulkan/icd.d/nvidia_icd.json
fi
if $device_tool && [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then  # what it lacks
    timeout -k 5 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl || { echo "installing .whl failed" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $out/NAME.log
    local name="$1" limit="$2" left=$((deadline - SECONDS - 15))
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: skipped, no time left" | tee "$out/$name.log"
        failed+=("$name")
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    if ! timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"; then
        failed+=("$name")
    fi
    pack
}

# Versions and the commit first: the rest is useless without them.
step imports 120 "$PY" -c "import torch, torchrl, tensordict, dm_control, mujoco, hydra; \
from aefrl.provenance import machine_info; import json; print(json.dumps(machine_info()))"
if [[ " ${failed[*]} " == *" imports "* ]]; then
    echo "the libraries do not load: run scripts/gpu_carry.sh here and carry .whl and .gl" >&2
    exit 2
fi
case "$stage" in
quick)  # the numbers first, then the tests, in what the deadline leaves
    step bench_cuda_quick 200 "$PY" scripts/bench.py --device cuda --graph --quick --skip-e2e \
        --out "$out/bench_cuda_quick.json"
    step e2e_cuda_envs1 150 env MUJOCO_GL=egl "$PY" scripts/bench.py --device cuda --only-e2e \
        --graph --replay-storage device --e2e-steps 64 --out "$out/e2e_cuda_envs1.json"
    step gpu_tests 240 env MUJOCO_GL=egl "$PY" -m pytest -q -p no:cacheprovider \
        --continue-on-collection-errors tests/test_cuda_graph.py tests/test_replay.py \
        tests/envs/test_imagination.py tests/agents/test_planner.py tests/test_seeding.py \
        tests/test_devices.py
    ;;
full)
    step bench_cuda 280 "$PY" scripts/bench.py --device cuda --graph --reps 10 --skip-e2e \
        --out "$out/bench_cuda.json"
    step bench_cuda_bf16 280 "$PY" scripts/bench.py --device cuda --graph --autocast bf16 \
        --reps 10 --skip-e2e --out "$out/bench_cuda_bf16.json"
    ;;
compile)  # the recompile-limit count against this torch's dynamo first (seconds)
    step compile_stats_test 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_compiled.py \
        -k compile_stats
    step bench_cuda_compile 280 "$PY" scripts/bench.py --device cuda --graph --compile --quick \
        --skip-e2e --out "$out/bench_cuda_compile.json"
    step bench_cuda_compile_bf16 280 "$PY" scripts/bench.py --device cuda --graph --compile \
        --autocast bf16 --quick --skip-e2e --out "$out/bench_cuda_compile_bf16.json"
    ;;
e2e)
    for n in 1 4 8; do  # torchrl's loop once, beside the first
        peer=()
        ((n > 1)) && peer=(--skip-e2e-torchrl)
        step "e2e_cuda_envs$n" 170 env MUJOCO_GL=egl "$PY" scripts/bench.py --device cuda \
            --only-e2e --graph --replay-storage device --num-envs "$n" --e2e-steps 256 \
            "${peer[@]}" --out "$out/e2e_cuda_envs$n.json"
    done
    ;;
esac

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
echo "all GPU measurements written to $out"
