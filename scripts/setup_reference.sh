#!/usr/bin/env bash
# Builds the llama.cpp reference that tp_numa's benchmarks and golden data compare with.
#
# Why: scripts/compare_llamacpp.py, scripts/make_golden.py and scripts/make_arch_fixtures.py
# need llama.cpp built for *this* CPU (-DGGML_NATIVE=ON), the same way on every machine, so
# a newcomer can rerun the published numbers. The source is the llama-cpp-python sdist from
# PyPI (it vendors llama.cpp in vendor/llama.cpp), pinned to one version; nothing of it is
# kept in the repository.
#
# What it makes, in a cache folder outside the repository
# (${TP_NUMA_REFERENCE_DIR:-$HOME/.cache/tp_numa/reference}):
#   bin/llama-bench, bin/llama-server, bin/llama-quantize   llama.cpp tools (static build)
#   bin/test-llama-archs      llama.cpp's test program that writes small random GGUF
#                             models of any architecture (-a ARCH -o DIR -s SEED)
#   venv/                     python venv with llama-cpp-python (same sdist, same native
#                             flags) and numpy, for golden data and the llama.cpp worker
#   reference.env             what was built (version, flags, paths), read by
#                             scripts/reference_paths.py
#
# Idempotent: every step is skipped when its result exists and was built from the same
# version, flags and CPU (a second run takes seconds). Environment overrides:
#   TP_NUMA_REFERENCE_DIR        the cache folder
#   TP_NUMA_LLAMA_CPP_PYTHON     llama-cpp-python version (default pinned below)
#   PYTHON                       interpreter for the venv (default python3, >= 3.9)
#   JOBS                         parallel compile jobs (default 2)
# Compiles run under `nice -n 19`. Needs cmake (>= 3.21), a C++17 compiler, and ninja or make.
set -euo pipefail

VERSION=${TP_NUMA_LLAMA_CPP_PYTHON:-0.3.36}
CACHE=${TP_NUMA_REFERENCE_DIR:-$HOME/.cache/tp_numa/reference}
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}
NATIVE_FLAGS="-DGGML_NATIVE=ON"
TARGETS="llama-bench llama-server llama-quantize test-llama-archs"
REPO=$(cd "$(dirname "$0")/.." && pwd)

say() { echo "[setup_reference] $*" >&2; }
die() { echo "[setup_reference] error: $*" >&2; exit 1; }
trap 'die "failed at line $LINENO (command: $BASH_COMMAND); fix the cause and rerun, finished steps are kept"' ERR

T0=$(date +%s)
CACHE=$(realpath -m "$CACHE")
case "$CACHE/" in
    "$REPO"/*)   # never inside the tracked tree (an ignored folder such as .venv/... is tolerated)
        if ! git -C "$REPO" check-ignore -q "$CACHE"; then
            die "$CACHE is inside the repository and not ignored by git; choose a folder outside it (TP_NUMA_REFERENCE_DIR)"
        fi ;;
esac
mkdir -p "$CACHE" || die "cannot create the cache folder $CACHE (set TP_NUMA_REFERENCE_DIR)"

# ---------------------------------------------------------------- tools
command -v cmake >/dev/null || die "cmake not found (apt-get install cmake, or pip install cmake)"
CMAKE_VER=$(cmake --version | head -1 | awk '{print $3}')
if [ "$(printf '%s\n3.21\n' "$CMAKE_VER" | sort -V | head -1)" != "3.21" ]; then
    die "cmake $CMAKE_VER is too old (need >= 3.21; pip install cmake)"
fi
command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler (apt-get install g++)"
if command -v ninja >/dev/null; then GEN=Ninja; elif command -v make >/dev/null; then GEN="Unix Makefiles"
else die "neither ninja nor make found (apt-get install ninja-build)"; fi
command -v "$PY" >/dev/null || die "python '$PY' not found (set PYTHON)"

# What the native build depends on: the version, the flags and this CPU's instruction set
# (a cache shared between machines with different CPUs must not reuse a -march=native build).
CPU_FLAGS=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | tr ' ' '\n' | sort | tr '\n' ' ' | cksum | cut -d' ' -f1)
KEY="version=$VERSION flags=$NATIVE_FLAGS cpu=$CPU_FLAGS"
stamp_ok() { [ -f "$CACHE/.stamp-$1" ] && [ "$(cat "$CACHE/.stamp-$1")" = "$KEY" ]; }
stamp_set() { echo "$KEY" >"$CACHE/.stamp-$1"; }

# ---------------------------------------------------------------- source (PyPI sdist)
SDIST="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
SRC="$CACHE/src/llama_cpp_python-$VERSION"
if [ ! -f "$SDIST" ]; then
    say "downloading the llama-cpp-python $VERSION sdist from PyPI"
    mkdir -p "$CACHE/sdist/tmp"
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist/tmp" >&2 \
        || die "pip download of llama-cpp-python==$VERSION failed (network? version on PyPI?)"
    mv "$CACHE/sdist/tmp"/llama_cpp_python-*.tar.gz "$SDIST" || die "pip did not produce llama_cpp_python-$VERSION.tar.gz"
    rm -rf "$CACHE/sdist/tmp"
else
    say "sdist present: $SDIST"
fi
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    say "unpacking the sdist"
    rm -rf "$SRC" && mkdir -p "$CACHE/src"
    tar -xzf "$SDIST" -C "$CACHE/src" || die "cannot unpack $SDIST (delete it and rerun)"
    [ -f "$SRC/vendor/llama.cpp/tests/test-llama-archs.cpp" ] \
        || die "$SDIST has no vendor/llama.cpp/tests/test-llama-archs.cpp (choose another TP_NUMA_LLAMA_CPP_PYTHON)"
fi
LCPP="$SRC/vendor/llama.cpp"

# ---------------------------------------------------------------- llama.cpp binaries
BUILD="$CACHE/build"
BIN="$CACHE/bin"
have_bins() { for t in $TARGETS; do [ -x "$BIN/$t" ] || return 1; done; }
if stamp_ok bins && have_bins; then
    say "llama.cpp binaries up to date: $BIN"
else
    if ! stamp_ok configure || [ ! -f "$BUILD/CMakeCache.txt" ]; then
        say "configuring llama.cpp ($VERSION, $NATIVE_FLAGS, static, $GEN) in $BUILD"
        rm -rf "$BUILD" "$CACHE/.stamp-bins"
        # Tests on (for test-llama-archs); no network at build time: no prebuilt web UI, no curl/openssl.
        nice -n 19 cmake -S "$LCPP" -B "$BUILD" -G "$GEN" -DCMAKE_BUILD_TYPE=Release $NATIVE_FLAGS \
            -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
            -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF >"$CACHE/configure.log" 2>&1 \
            || { tail -30 "$CACHE/configure.log" >&2; die "cmake configure failed (full log: $CACHE/configure.log)"; }
        stamp_set configure
    fi
    say "compiling $TARGETS (-j$JOBS, nice 19; 15-25 min on 2 cores; log: $CACHE/build.log)"
    t=$(date +%s)
    # shellcheck disable=SC2086
    nice -n 19 cmake --build "$BUILD" --target $TARGETS -j "$JOBS" >"$CACHE/build.log" 2>&1 \
        || { tail -30 "$CACHE/build.log" >&2; die "llama.cpp build failed (full log: $CACHE/build.log)"; }
    mkdir -p "$BIN"
    for tgt in $TARGETS; do
        exe="$BUILD/bin/$tgt"
        [ -x "$exe" ] || die "built, but $exe is missing"
        ln -sf "$exe" "$BIN/$tgt"
    done
    "$BIN/llama-bench" --help >/dev/null 2>&1 || die "$BIN/llama-bench does not run (illegal instruction? rebuild)"
    stamp_set bins
    say "binaries built in $(( $(date +%s) - t )) s"
fi

# ---------------------------------------------------------------- venv with llama-cpp-python
VENV="$CACHE/venv"
VPY="$VENV/bin/python"
venv_ok() { "$VPY" -c "import numpy, llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; }
if stamp_ok venv && [ -x "$VPY" ] && venv_ok; then
    say "llama-cpp-python venv up to date: $VENV"
else
    if [ ! -x "$VPY" ]; then
        say "creating $VENV"
        "$PY" -m venv "$VENV" || die "cannot create a venv with $PY (apt-get install python3-venv)"
    fi
    say "installing numpy into $VENV"
    "$VPY" -m pip install -q numpy >&2 || die "pip install numpy failed"
    say "compiling llama-cpp-python $VERSION with CMAKE_ARGS=\"$NATIVE_FLAGS\" (8-15 min on 2 cores; log: $CACHE/venv-build.log)"
    t=$(date +%s)
    CMAKE_ARGS="$NATIVE_FLAGS -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        nice -n 19 "$VPY" -m pip install -v --no-deps --force-reinstall --no-cache-dir "$SDIST" >"$CACHE/venv-build.log" 2>&1 \
        || { tail -30 "$CACHE/venv-build.log" >&2; die "llama-cpp-python build failed (full log: $CACHE/venv-build.log)"; }
    # its runtime dependencies (numpy already there), from the ordinary index
    "$VPY" -m pip install -q typing-extensions diskcache jinja2 >&2 || die "pip install of llama-cpp-python's dependencies failed"
    venv_ok || die "llama_cpp does not import in $VENV (see $CACHE/venv-build.log)"
    stamp_set venv
    say "llama-cpp-python built in $(( $(date +%s) - t )) s"
fi

# ---------------------------------------------------------------- summary
cat >"$CACHE/reference.env" <<EOF
# written by scripts/setup_reference.sh; read by scripts/reference_paths.py
LLAMA_CPP_PYTHON_VERSION=$VERSION
LLAMA_CPP_SOURCE=$LCPP
CMAKE_FLAGS=$NATIVE_FLAGS
PYTHON=$VPY
BIN=$BIN
EOF
say "ok: llama.cpp from llama-cpp-python $VERSION in $CACHE ($(( $(date +%s) - T0 )) s)"
say "  binaries: $BIN/{llama-bench,llama-server,llama-quantize,test-llama-archs}"
say "  python:   $VPY"
