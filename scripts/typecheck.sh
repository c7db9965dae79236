#!/usr/bin/env bash
# mypy over the installed namespace. The folders model/, server/, weights/ and kernels/ install as
# avatar_forcing.<name> (pyproject's package-dir), a mapping mypy cannot express, so check a tree of links
# laid out as the installed package is.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
tree=build/typecheck
rm -rf "$tree" && mkdir -p "$tree/avatar_forcing"
for f in avatar_forcing/*.py; do ln -s "$PWD/$f" "$tree/$f"; done
for d in model server weights kernels; do ln -s "$PWD/$d" "$tree/avatar_forcing/$d"; done
cd "$tree"
exec "$python" -m mypy --config-file "$OLDPWD/pyproject.toml" -p avatar_forcing "$@"
