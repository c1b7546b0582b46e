#!/usr/bin/env bash
# Create .venv with torch, the newest supported diffusers (0.42.1 as of 2026-12), cachedit and its three backend plugins (editable).
# torch is installed first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA build.
# On a CUDA machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.13.0 --index-url ...").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's and the build backends' own chatter goes to a log, shown only if a step fails.
log=.venv/setup.log
quiet() { "$@" >>"$log" 2>&1 || { cat "$log"; echo "setup failed: $*" >&2; exit 1; }; }
: >"$log"
echo "installing into .venv (log: $log)"
quiet .venv/bin/python -m pip install --upgrade pip
# shellcheck disable=SC2086
quiet .venv/bin/python -m pip install ${TORCH_SPEC:-torch==2.13.0}
quiet .venv/bin/python -m pip install -e ".[test]" -e plugins/cpu_ref -e plugins/cuda -e plugins/ascend
.venv/bin/python -m cachedit backends
