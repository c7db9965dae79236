#!/usr/bin/env bash
# Copy the golden files the GPU check reads into .golden/ (ignored by git), to be carried to the GPU
# machine: the device tool sends the checkout only, and the whole golden folder would not fit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="${1:-$root/../shared/golden/avatar_forcing_ref_v1}"
dst="$root/.golden/$(basename "$src")"
mkdir -p "$dst"
for f in small_config.json small_weights.safetensors case_sample.safetensors case_ae_encode.safetensors; do
    cp "$src/$f" "$dst/$f"
done
du -sh "$dst"
