#!/usr/bin/env bash
# Developer rebuild of tp_numa/_C*.so after editing csrc/ (incremental, ninja).
# Serialised with a lock so parallel rebuilds do not clobber each other, and the new
# library is moved into place atomically so running processes keep their old copy.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
exec 9>build/.build_ext.lock
flock 9
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python setup.py -q build_ext -b build/lib >&2
so=$(ls build/lib/tp_numa/_C*.so)
cp "$so" "tp_numa/.$(basename "$so").tmp"
mv -f "tp_numa/.$(basename "$so").tmp" "tp_numa/$(basename "$so")"
echo "built tp_numa/$(basename "$so")" >&2
