#!/usr/bin/env bash
# Compile-checks C++ files alone (no link) with the extension's flags and torch headers:
#   scripts/check_cpp.sh csrc/quant/foo.cpp [...]
set -euo pipefail
cd "$(dirname "$0")/.."
TI=$(.venv/bin/python -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
PI=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in "$@"; do
    g++ -fsyntax-only -std=c++17 -O3 -fopenmp -Icsrc $TI -I"$PI" -DTORCH_EXTENSION_NAME=_C "$f"
done
echo "ok" >&2
