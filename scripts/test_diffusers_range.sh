#!/usr/bin/env bash
# Run the tests that cover cachedit's diffusers internals (cachedit/_diffusers_compat.py) against the oldest and
# the newest diffusers of the supported range, without a new venv: each version is installed once, --no-deps,
# into its own overlay folder under .venv/, put first on PYTHONPATH over .venv's own diffusers.
# Needs .venv (scripts/setup.sh). Tests: CACHEDIT_DIFFUSERS_TESTS (space-separated). Versions: CACHEDIT_DIFFUSERS_VERSIONS="0.41.0 0.42.1" (the default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
VERSIONS=${CACHEDIT_DIFFUSERS_VERSIONS:-"0.41.0 0.42.1"}
# The compat module's own checks; every tiny family end to end, plain and never-skipping-cached (bitwise); the API.
read -r -a TESTS <<< "${CACHEDIT_DIFFUSERS_TESTS:-tests/test_diffusers_compat.py tests/test_default_path.py tests/test_tiny_pipelines.py tests/test_accelerate.py}"

for version in $VERSIONS; do
    overlay=.venv/diffusers-overlays/$version
    if [ ! -f "$overlay/diffusers/__init__.py" ]; then
        "$PY" -m pip install -q --no-deps --target "$overlay" "diffusers==$version" >>.venv/setup.log 2>&1 \
            || { tail -20 .venv/setup.log; echo "could not install diffusers==$version" >&2; exit 1; }
    fi
    found=$(PYTHONPATH="$overlay" "$PY" -c "import diffusers; print(diffusers.__version__)")
    [ "$found" = "$version" ] || { echo "overlay $overlay gives diffusers $found, not $version" >&2; exit 1; }
    echo "== diffusers $version"
    start=$SECONDS
    PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
    echo "== diffusers $version: $((SECONDS - start)) s"
done
