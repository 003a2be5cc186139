#!/usr/bin/env bash
# Fill .whl/gpu with wheels for what a bare GPU machine (Python 3.12, torch + triton only) lacks for
# scripts/gpu_check.sh: diffusers (the Wan VAE and the no-cache baseline) and its dependencies,
# numpy, safetensors, tqdm, pytest. Carry .whl/gpu to the GPU machine (about 40 MB); the check
# installs from it with pip --no-index. PY_VERSION overrides the target Python (default 3.12).
set -eu
cd "$(dirname "$0")/.."
DEST=${FORCEKIT_WHEELS:-.whl/gpu}
mkdir -p "$DEST"
python3 -m pip download -q -d "$DEST" --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  diffusers numpy safetensors tqdm pytest
du -sh "$DEST"
