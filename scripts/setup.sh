#!/usr/bin/env bash
# Set up a local .venv with pinned versions (once; again only when requirements.lock or pyproject.toml change), then
# run one job:   bash scripts/setup.sh quickstart [slm quickstart flags]
#                bash scripts/setup.sh test       [pytest flags]
#                bash scripts/setup.sh slm ARGS   (any slm command)
#                bash scripts/setup.sh peers      (optional: llama.cpp via llama-cpp-python, a C++ build of ~5 min,
#                                                  for the llama.cpp parity tests and benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.slmkit-setup
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned dependencies into .venv (torch CPU build; first time takes a few minutes)" >&2
  # torch first and alone, pinned: an unpinned torch pulled in by another package would fetch a multi-GB CUDA build
  .venv/bin/python -m pip install -q torch==2.13.0
  # the lock is a complete environment, so no resolution is needed (and the corpus packages must not pull deps)
  .venv/bin/python -m pip install -q --no-deps -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi

job=${1:-quickstart}
shift || true
case "$job" in
  quickstart) exec .venv/bin/slm quickstart "$@" ;;
  test)
    .venv/bin/ruff check slmkit tests bench
    exec .venv/bin/python -m pytest -q "$@" ;;
  slm) exec .venv/bin/slm "$@" ;;
  peers)
    if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
      # ggml's AMX backend segfaults in its first decode (ggml-org/llama.cpp#20824): every other native path, AMX off
      export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    fi
    echo "setup: building llama-cpp-python (llama.cpp) from source; takes several minutes" >&2
    exec .venv/bin/python -m pip install -q --no-deps --no-cache-dir llama-cpp-python==0.3.36 diskcache==5.6.3 ;;
  *) echo "usage: bash scripts/setup.sh quickstart|test|slm|peers [args]" >&2; exit 2 ;;
esac
