#!/usr/bin/env bash
# Set up a local .venv with pinned versions (once; again only when requirements.lock or pyproject.toml change), then
# run one job:   bash scripts/setup.sh quickstart [slm quickstart flags]
#                bash scripts/setup.sh test       [pytest flags]
#                bash scripts/setup.sh slm ARGS   (any slm command)
#                bash scripts/setup.sh peers      (optional: llama.cpp via llama-cpp-python and its llama-server in
#                                                  .venv/peers/bin, two C++ builds of several minutes each, for the
#                                                  llama.cpp parity tests and benchmarks)
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
    # the web chat test drives Debian's chromium (Playwright's browser download is often unreachable); without it
    # that test skips, so a failed install does not fail the job
    if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      echo "setup: installing Debian's chromium for the web chat test" >&2
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 ||
        echo "setup: could not install chromium; the web chat test will skip" >&2
    fi
    .venv/bin/ruff check slmkit tests bench
    # keep compiled and assert-rewritten modules between runs (some images set PYTHONDONTWRITEBYTECODE, which makes
    # every run re-compile slmkit and re-rewrite the tests: seconds of the quick lane's minute); __pycache__ is ignored
    export PYTHONDONTWRITEBYTECODE=
    # two worker processes (pytest-xdist): the suite's tests are independent and each sets its own torch threads;
    # SLM_TEST_WORKERS=0 runs them in this process (a debugger, or -x stopping at the first failure in order)
    exec .venv/bin/python -m pytest -q -n "${SLM_TEST_WORKERS:-2}" "$@" ;;
  slm) exec .venv/bin/slm "$@" ;;
  peers)
    if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
      # ggml's AMX backend segfaults in its first decode (ggml-org/llama.cpp#20824): every other native path, AMX off
      export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    fi
    # one sdist for both: the Python binding, and llama-server built from the llama.cpp tree it vendors
    have_py=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null \
      || true)
    server=.venv/peers/bin/llama-server
    # built for this CPU's instruction set: a CPU change between sessions (another AVX-512 subset) means a rebuild
    cpu=$(grep -m1 -w flags /proc/cpuinfo | sha256sum | cut -c1-16)
    [ "$(cat "$server.cpu" 2>/dev/null)" = "$cpu" ] || rm -f "$server"
    if [ "$have_py" = 0.3.36 ] && [ -x "$server" ]; then
      echo "setup: llama-cpp-python 0.3.36 and $server are already built" >&2; exit 0
    fi
    src=$(mktemp -d); trap 'rm -rf "$src"' EXIT
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$src" llama-cpp-python==0.3.36
    sdist="$src/llama_cpp_python-0.3.36.tar.gz"
    if [ "$have_py" != 0.3.36 ]; then
      echo "setup: building llama-cpp-python (llama.cpp) from source; takes several minutes" >&2
      nice -n 19 .venv/bin/python -m pip install -q --no-deps --no-cache-dir "$sdist" diskcache==5.6.3
    fi
    if [ ! -x "$server" ]; then
      echo "setup: building llama-server from the same llama.cpp source; takes several minutes" >&2
      tar -xzf "$sdist" -C "$src"
      # static, no HTTPS (it serves localhost), the server target alone, CMAKE_ARGS (the AMX switch above); the
      # compiler's many warnings go to a log, shown only if the build fails
      if ! { cmake -S "$src/llama_cpp_python-0.3.36/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
               -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
               ${CMAKE_ARGS:-} && nice -n 19 cmake --build "$src/build" --target llama-server -j "$(nproc)"
           } >"$src/build.log" 2>&1; then
        tail -n 40 "$src/build.log" >&2; echo "setup: the llama-server build failed (its log's end above)" >&2; exit 1
      fi
      mkdir -p "$(dirname "$server")"
      # copied then renamed: an interrupted build never leaves a half-written binary that the check above trusts
      cp "$src/build/bin/llama-server" "$server.tmp" && mv "$server.tmp" "$server" && echo "$cpu" > "$server.cpu"
    fi ;;
  *) echo "usage: bash scripts/setup.sh quickstart|test|slm|peers [args]" >&2; exit 2 ;;
esac
