#!/usr/bin/env bash
# Fill a wheel folder with what a bare GPU machine (Python 3.12, torch + triton only) lacks:
#   scripts/gpu_wheels.sh          .whl/gpu for scripts/gpu_check.sh: diffusers (the Wan VAE and the no-cache
#                                  baseline) and its dependencies, numpy, safetensors, tqdm, pytest (about 40 MB)
#   scripts/gpu_wheels.sh recipe   .whl/recipe for scripts/gpu_recipe.sh: numpy, safetensors, tqdm and ViZDoom
#                                  (the engine, without its optional gymnasium / pygame dependencies; about 57 MB)
# Carry the folder to the GPU machine; the scripts install from it with pip --no-index. PY_VERSION overrides
# the target Python (default 3.12), FORCEKIT_WHEELS the folder.
set -eu
cd "$(dirname "$0")/.."
KIND=${1:-check}
[ "$KIND" = check ] || [ "$KIND" = recipe ] || { echo "usage: $0 [recipe]" >&2; exit 2; }
DEST=${FORCEKIT_WHEELS:-.whl/$([ "$KIND" = recipe ] && echo recipe || echo gpu)}
mkdir -p "$DEST"
download() {
  python3 -m pip download -q -d "$DEST" --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "$@"
}
if [ "$KIND" = recipe ]; then
  download numpy safetensors tqdm
  download --no-deps vizdoom
else
  download diffusers numpy safetensors tqdm pytest
fi
du -sh "$DEST"
