#!/usr/bin/env bash
# Debian packages the project needs at run or test time. Installs only what is missing (needs root then).
set -euo pipefail

# chromium + chromium-driver: the browser test; prometheus: promtool and a real scrape in tests;
# iproute2: private network namespaces for WebRTC tests; espeak-ng: the built-in test phrase.
REQUIRED=(chromium chromium-driver prometheus iproute2 espeak-ng)

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
