#!/usr/bin/env bash
# Run pytest inside a private network namespace that has a second loopback address, 127.0.0.2: ICE ignores
# 127.0.0.1, so WebRTC peers on one machine need another local address (see tests/server_harness.py).
# Without root (or unshare / ip) the tests run as they are and the WebRTC ones skip, saying why.
set -euo pipefail
python="${PYTHON:-.venv/bin/python}"
if [ "$(id -u)" -eq 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null \
        && unshare -n true 2>/dev/null; then
    exec unshare -n sh -c 'ip link set lo up && ip addr add 127.0.0.2/8 dev lo && exec "$@"' \
        sh "$python" -P -m pytest "$@"
fi
echo "run-tests: no private network namespace here (needs root, unshare and ip); WebRTC tests will skip" >&2
exec "$python" -P -m pytest "$@"
