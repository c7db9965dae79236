#!/usr/bin/env bash
# Debian packages the project needs, for serving or for testing. Installs only what is missing (needs root
# then). Usage: scripts/install-system-deps.sh [serve|test]   (default: test, which includes serve's)
set -euo pipefail

# serve: espeak-ng speaks the page's built-in test phrase (without it, a synthetic vowel sequence).
SERVE=(espeak-ng)
# test: chromium + chromium-driver drive the real page; prometheus brings promtool and a real scrape;
# iproute2 makes the private network namespaces the WebRTC tests run in.
TEST=(chromium chromium-driver prometheus iproute2)

case "${1:-test}" in
    serve) REQUIRED=("${SERVE[@]}") ;;
    test) REQUIRED=("${SERVE[@]}" "${TEST[@]}") ;;
    *) echo "usage: $0 [serve|test]" >&2; exit 2 ;;
esac

missing=()
for pkg in "${REQUIRED[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
