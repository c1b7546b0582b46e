#!/usr/bin/env bash
# Create .venv with torch, diffusers 0.42.1, cachedit and its three backend plugins (editable).
# torch is installed first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA build.
# On a CUDA machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.13.0 --index-url ...").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[test]" -e plugins/cpu_ref -e plugins/cuda -e plugins/ascend
.venv/bin/python -m cachedit backends
