#!/usr/bin/env bash
# Media work at several session counts: a server on the small configuration (random weights) with
# MEDIA_PROCESSES video-encoding processes, and `avatar-forcing loadtest` with receive-only peers against it.
# Usage: benchmarks/media_load.sh MEDIA_PROCESSES [SESSIONS...]   (default sessions: 4 8 16)
# WebRTC on one machine needs a loopback address ICE accepts: run as root, it makes a private network
# namespace with 127.0.0.2 (as scripts/run-tests.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
processes="${1:?usage: benchmarks/media_load.sh MEDIA_PROCESSES [SESSIONS...]}"
shift
sessions="${*:-4 8 16}"
golden="${AVATAR_FORCING_GOLDEN:-../shared/golden/avatar_forcing_ref_v1}"
portrait="${PORTRAIT:-../shared/media/rumi.jpg}"
python="${PYTHON:-.venv/bin/python}"
if [ -z "${MEDIA_LOAD_IN_NETNS:-}" ]; then
    exec unshare -n env MEDIA_LOAD_IN_NETNS=1 sh -c 'ip link set lo up && ip addr add 127.0.0.2/8 dev lo && exec "$@"' \
        sh "$0" "$processes" $sessions
fi
log="$(mktemp /tmp/media-load-server.XXXXXX.log)"
AVATAR_FORCING_CONFIG="$golden" AVATAR_FORCING_WEIGHTS="$golden/small_weights.safetensors" \
AVATAR_FORCING_HOST=127.0.0.2 AVATAR_FORCING_PORT=8090 AVATAR_FORCING_DEVICE=cpu \
AVATAR_FORCING_MAX_SESSIONS=16 AVATAR_FORCING_OVERLOAD_ADMISSION=off AVATAR_FORCING_LOG_FORMAT=json \
AVATAR_FORCING_MEDIA_PROCESSES="$processes" "$python" -m avatar_forcing.cli serve >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    "$python" -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.2:8090/readyz').status_code != 200)" \
        2>/dev/null && break
    sleep 1
done
echo "media processes: $processes (server log: $log)"
"$python" -m avatar_forcing.cli loadtest --url http://127.0.0.2:8090 --portrait "$portrait" \
    --sessions $sessions --seconds 10 --cycles 0
