#!/usr/bin/env bash
# The GPU checks of issue 5 in one run on a CUDA machine:
#   1. every kernel's fast path against its reference on the GPU (bf16 and fp32), and the bf16 engine
#      against the fp32 engine on the golden inputs scaled up to the full configuration;
#   2. `avatar-forcing bench gpu` on the full configuration (random weights: same speed as trained ones),
#      eager and compiled, appended with the device name and the exact command to benchmarks/RESULTS.md.
#
# Needs: torch with CUDA; this package's runtime dependencies importable (on this workplace's GPU image,
# PyAV, aiortc, fastapi, uvicorn, pydantic, websockets and python-multipart are missing: carry their wheels
# as the device tool's README explains); the golden folder for the precision test, named by
# AVATAR_FORCING_GOLDEN (copy ../shared/golden into an ignored folder of the checkout and carry it).
set -euo pipefail
out="${OUT:-benchmarks}"
mkdir -p "$out"
python3 -m pytest tests/test_kernels.py tests/test_precision.py -q -rs -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
for extra in "" "--compile"; do
    python3 -m avatar_forcing.cli bench gpu --config official --device cuda --blocks 20 --max-sessions 64 \
        --results "$out/RESULTS.md" $extra 2>&1 | tee -a "$out/gpu-bench.log"
done
