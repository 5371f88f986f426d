#!/usr/bin/env bash
# A separate Python 3.12 environment (.venv-sglang) holding the real sglang==0.5.15, importable on
# a CPU-only machine, for tests/sglang_real (run through tests/test_sglang_real_env.py).
#
# - sglang 0.5.15's full dependencies are GPU-only (flashinfer, sglang-kernel, flash-attn-4, ...):
#   it is installed with --no-deps, plus exactly what importing sglang.srt.server_args,
#   sglang.srt.managers.{scheduler,schedule_batch} and sglang.srt.multiplex.pdmux_context needs,
#   and its benchmark client sglang.benchmark.serving (datasets and what it pulls in).
# - torch is sglang's pin, 2.11.0. PyPI has no CPU build of it, and the PyTorch CPU index is not
#   reachable here: the PyPI (CUDA 13) build with its nvidia-* wheels imports and runs on CPU
#   (about 2.6 GB of the 2.7 GB download; the environment takes 5.1 GB). The main environment's CPU torch 2.13 is cp311
#   and cannot serve: sglang imports torchvision at start, and the only torchvision for torch 2.13
#   reachable here is a CUDA build, which needs torch's CUDA libraries.
# - bullet_kernels and bullet_sglang are installed editable (--no-deps) from this checkout.
# Idempotent: a stamp of this file's pins skips the installs when nothing changed.
# SGLANG_VENV overrides the location; PYTHON312 the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SGLANG_VENV:-.venv-sglang}

find_python312() {
  local root
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for py in "${PYTHON312:-}" python3.12 "$root"/versions/3.12*/bin/python3.12; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$py"
      return 0
    fi
  done
  return 1
}

# Exact pins: sglang's own where it pins (torch, torchvision for it, transformers, openai), and the
# versions that resolved when this list was made for the rest.
PINS=(
  torch==2.11.0 torchvision==0.26.0 transformers==5.12.1 openai==2.6.1
  numpy==2.5.5 pyyaml==6.0.4 orjson==3.13.0 psutil==7.2.2 pybase64==1.5.1 requests==2.34.2
  packaging==26.4 starlette==1.10.0 fastapi==0.165.0 uvicorn==0.54.0 tqdm==4.70.1 ipython==9.18.1
  pydantic==2.14.4 aiohttp==3.14.5 pyzmq==27.3.0 setproctitle==1.3.8 dill==0.4.1
  partial-json-parser==0.2.1.1.post7 msgspec==0.23.0 sentencepiece==0.2.3 einops==0.8.2
  compressed-tensors==0.20.1 gguf==0.19.0 uvloop==0.23.0 jsonschema==4.26.0 soundfile==0.13.1
  python-multipart==0.0.34 nvidia-ml-py==13.615.71 pytest==9.0.3
  datasets==5.2.0 pyarrow==26.0.1 pandas==3.1.1 fsspec==2026.9.0 multiprocess==0.70.19 xxhash==4.1.0
)
SGLANG=sglang==0.5.15
STAMP="$VENV/.bullet-sglang-env"
WANT="$(printf '%s\n' "${PINS[@]}" "$SGLANG" | sha256sum | cut -d' ' -f1)"

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  echo "sglang_cpu_env: $VENV is up to date"
else
  PY=$(find_python312) || {
    echo "sglang_cpu_env: needs Python 3.12, which the pins below were resolved for (none found on PATH or in pyenv;" \
         "give PYTHON312=/path/to/python3.12, or: pyenv install 3.12.1)" >&2
    exit 1
  }
  start=$SECONDS
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  echo "torch==2.11.0" > "$VENV/constraints.txt"  # nothing may pull another torch
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" "${PINS[@]}"
  "$VENV/bin/python" -m pip install -q --no-deps "$SGLANG"
  echo "$WANT" > "$STAMP"
  echo "sglang_cpu_env: installed in $((SECONDS - start)) s"
fi
# Editable installs map the packages' files at install time: redone every time (about 15 s).
"$VENV/bin/python" -m pip install -q --no-deps -e . -e python/
