#!/usr/bin/env bash
# What the device tool's GPU machine lacks, prepared here for it to carry: the device image has
# python3 3.12 with a CUDA torch (2.11, not the 2.13 pinned for CPUs), numpy, scipy, lxml, absl,
# protobuf, tensorboard, pillow, pytest, but no torchrl, tensordict, dm-control, mujoco, hydra
# (/work/.library/device/KINDS.md). This downloads their cp312 wheels into .whl/ (mujoco without
# its experimental/ folder, dm-control without locomotion/, which nothing here imports: 35 MB
# instead of 88, under the 64 MiB a call carries) and the EGL loaders into .gl/ (the device
# README's recipe). Both folders are git-ignored; name them in the device run's `carry`, and
# scripts/bench_gpu.sh installs them. Needs a package registry (pip) and apt; run once.
#
#   bash scripts/gpu_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .gl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
for pkg in torchrl==0.14.1 tensordict==0.14.3 dm-control==1.0.50 mujoco==3.17.0 dm-env dm-tree \
    glfw PyOpenGL hydra-core==1.3.2 omegaconf==2.3.0 orjson pyvers hoptorch importlib_metadata; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl "$pkg"
done
# hydra's parser runtime has no wheel on the index (an sdist, pure Python): build one.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
python3 - <<'EOF'
"""Drop the folders nothing here imports from the two large wheels (pip does not check RECORD)."""
import glob
import os
import zipfile

for pattern, drop in (("dm_control-*.whl", "dm_control/locomotion/"),
                      ("mujoco-*.whl", "mujoco/experimental/")):
    for path in glob.glob(os.path.join(".whl", pattern)):
        with zipfile.ZipFile(path) as src:
            if not any(n.startswith(drop) for n in src.namelist()):
                continue  # repacked already
            with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
                for info in src.infolist():
                    if not info.filename.startswith(drop):
                        dst.writestr(info, src.read(info.filename))
        os.replace(path + ".tmp", path)
EOF
o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
mkdir -p /tmp/amd64/partial
apt-get "${o[@]}" update -qq
(cd .gl && apt-get "${o[@]}" download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 \
    libgles2 2>/dev/null)
du -sh .whl .gl
