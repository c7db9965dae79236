#!/usr/bin/env bash
# mypy over the installed namespace. The folders model/, server/, weights/ and kernels/ install as
# avatar_forcing.<name> (pyproject's package-dir), a mapping mypy cannot express, so check a tree of links
# laid out as the installed package is.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
# The check runs inside the link tree: a relative interpreter path (the Makefile passes one) must not break.
case "$python" in */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;; esac
tree=build/typecheck
scripts/link-tree.sh "$tree"
cd "$tree"
# The cache stays outside the tree (which link-tree.sh lays anew each run), so a second run is incremental.
exec "$python" -m mypy --config-file "$OLDPWD/pyproject.toml" --cache-dir "$OLDPWD/build/mypy-cache" \
    -p avatar_forcing "$@"
