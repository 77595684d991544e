#!/usr/bin/env bash
# Builds the native ops csrc/** into tp_numa/_C*.so, incrementally: the objects and ninja's
# state live in build/temp, so ninja recompiles only the files whose inputs (the .cpp or a
# header it includes, the flags) changed, then the library is relinked.
#
#   bash scripts/build_ext.sh               build now (ninja decides what to recompile)
#   bash scripts/build_ext.sh --if-changed  do nothing when scripts/build_stamp.py finds the
#                                           library up to date (what scripts/setup.sh runs)
#   bash scripts/build_ext.sh --clean       throw the objects away and rebuild everything
#
# Serialised with a lock so parallel rebuilds do not clobber each other, and the new
# library is moved into place atomically so running processes keep their old copy.
# Every successful build records its inputs in build/native-build.json (the stamp that
# --if-changed compares with).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/build_ext.sh [--if-changed | --clean]"
mode=build
case "${1:-}" in
    "") ;;
    --if-changed) mode=if-changed ;;
    --clean) mode=clean ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "build_ext: unknown option '$1'; $usage" >&2; exit 2 ;;
esac
VPY=.venv/bin/python
[ -x "$VPY" ] || { echo "build_ext: error: no .venv here; run 'bash scripts/setup.sh' first" >&2; exit 1; }
# torch.utils.cpp_extension runs the `ninja` it finds on PATH: use the one setup.sh installs
# in .venv, so the same ninja always reads build/temp's logs (another version may discard
# them and recompile everything) and a machine without a system ninja builds incrementally
# too (without ninja, torch falls back to compiling every file every time).
PATH="$PWD/.venv/bin:$PATH"
[ -x .venv/bin/ninja ] || { echo "build_ext: error: .venv/bin/ninja is missing; run 'bash scripts/setup.sh' (or .venv/bin/pip install ninja)" >&2; exit 1; }
mkdir -p build
exec 9>build/.build_ext.lock
flock 9
if [ "$mode" = if-changed ]; then
    # Decided under the lock: a concurrent build may have just brought the library up to date.
    if ! action=$("$VPY" scripts/build_stamp.py check 2>build/.build_ext.why); then
        cat build/.build_ext.why >&2
        echo "build_ext: error: scripts/build_stamp.py check failed (see above)" >&2
        exit 1
    fi
    case "$action" in
        up-to-date)
            echo "[build_ext] tp_numa._C is up to date (sources, headers, setup.py, torch, compiler and flags unchanged)" >&2
            exit 0 ;;
        clean) echo "[build_ext] rebuilding tp_numa._C from scratch:" >&2 ;;
        build) echo "[build_ext] building tp_numa._C (ninja recompiles only what changed):" >&2 ;;
        *) cat build/.build_ext.why >&2; echo "build_ext: error: build_stamp.py check said '$action'" >&2; exit 1 ;;
    esac
    cat build/.build_ext.why >&2
    [ "$action" = clean ] && mode=clean
fi
if [ "$mode" = clean ]; then
    rm -rf build/temp build/lib
fi
"$VPY" scripts/build_stamp.py begin
t0=$(date +%s)
# The full compiler output (torch's headers alone warn a lot) goes to the log; the terminal
# gets one line per compiled file, and the log's tail if the build fails.
log=build/build_ext.log
if ! MAX_JOBS=${MAX_JOBS:-2} "$VPY" setup.py -q build_ext -b build/lib -t build/temp 2>&1 | tee "$log" \
        | sed -unE 's#^\[([0-9]+/[0-9]+)\] .* -MF [^ ]*/build/temp/([^ ]*)\.o\.d .*#  [\1] \2.cpp#p' >&2; then
    # The compiler's and linker's diagnostics, not the Python traceback that ends the log.
    diag='FAILED:| error: |fatal error|undefined reference|ld returned|: Error: '
    if grep -qE "$diag" "$log"; then
        grep -E "$diag" "$log" | head -n 40 | cut -c1-300 >&2
    else
        tail -n 30 "$log" >&2
    fi
    echo "build_ext: error: building tp_numa._C failed (full log: $log)" >&2
    exit 1
fi
so=build/lib/tp_numa/_C$("$VPY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
[ -f "$so" ] || { echo "build_ext: error: the build did not produce $so" >&2; exit 1; }
cp "$so" "tp_numa/.$(basename "$so").tmp"
mv -f "tp_numa/.$(basename "$so").tmp" "tp_numa/$(basename "$so")"
"$VPY" scripts/build_stamp.py commit
echo "[build_ext] built tp_numa/$(basename "$so") in $(( $(date +%s) - t0 )) s" >&2
