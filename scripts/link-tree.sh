#!/usr/bin/env bash
# Lay out the checkout as the installed package under DEST (a tree of links), so that `import avatar_forcing`
# works with PYTHONPATH=DEST and no pip install: model/, server/, weights/ and kernels/ install as
# avatar_forcing.<name> (pyproject's package-dir). Used by the type check and the GPU check.
set -euo pipefail
dest="${1:?usage: link-tree.sh DEST}"
root="$(cd "$(dirname "$0")/.." && pwd)"
rm -rf "$dest" && mkdir -p "$dest/avatar_forcing"
for f in "$root"/avatar_forcing/*; do ln -s "$f" "$dest/avatar_forcing/$(basename "$f")"; done
for d in model server weights kernels; do ln -s "$root/$d" "$dest/avatar_forcing/$d"; done
