#!/usr/bin/env bash
# The GPU check, in two calls of the device tool, each well under 6 minutes on an H100/H200:
#   scripts/gpu-check.sh 1   kernel, precision and compile tests on the GPU, then the eager bench
#                            (full configuration, random weights: same speed as trained ones) at 1/4/16/32,
#                            and one session with the auto-encoder in channels_last memory
#   scripts/gpu-check.sh 2   the compiled bench (every bucket precompiled before timing), then one session
#                            with the whole denoising loop compiled
# Add --rehearse to run the same steps here on the CPU with the small golden configuration, so that a GPU
# run meets no Python error (tests/test_gpu_check.py does this in CI).
#
# Nothing is installed on the GPU machine: the checkout is laid out as the package with links
# (scripts/link-tree.sh) and run with the machine's own torch. The GPU part never imports the server's
# packages (aiortc, fastapi, PyAV), so no wheels travel. The golden files the tests read travel in .golden/
# (scripts/gpu-check-prepare.sh copies them, ~16 MiB). Full logs go to $OUT; a short table is printed last.
set -uo pipefail
part="${1:?usage: gpu-check.sh 1|2 [--rehearse]}"
rehearse="${2:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${OUT:-build/gpu-check}"
mkdir -p "$out"
python="${PYTHON:-python3}"
scripts/link-tree.sh build/pkg
export PYTHONPATH="$root/build/pkg:$root/tests" PYTHONUNBUFFERED=1
golden="${AVATAR_FORCING_GOLDEN:-$root/.golden/avatar_forcing_ref_v1}"
[ -f "$golden/small_config.json" ] || golden="$root/../shared/golden/avatar_forcing_ref_v1"
export AVATAR_FORCING_GOLDEN="$golden"

if [ "$rehearse" = "--rehearse" ]; then
    # The same commands, small: the tests are only collected (CI runs them anyway), one session benched.
    bench=(--config "$golden" --device cpu --blocks 2 --max-sessions 1 --sessions 1)
    tests=(--collect-only tests/test_kernels.py tests/test_precision.py tests/test_compile.py)
else
    "$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
        || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
    bench=(--config official --device cuda --blocks 20 --max-sessions 32 --sessions 1 4 16 32)
    tests=(tests/test_kernels.py tests/test_precision.py tests/test_compile.py)
fi

status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember a failure, go on
    local name="$1"; shift
    echo "== $name: $*"
    "$@" > "$out/$name.log" 2>&1 || { echo "!! $name failed (exit $?), see $name.log"; status=1; }
    tail -n 3 "$out/$name.log"
}

case "$part" in
    1)
        run tests "$python" -m pytest -q -rs -p no:cacheprovider "${tests[@]}"
        run bench-eager "$python" -m avatar_forcing.cli bench gpu "${bench[@]}" --results "$out/RESULTS.md"
        # The motion auto-encoder in NHWC memory, one session, against the same run's reference way.
        run bench-eager-nhwc timeout 90 "$python" -m avatar_forcing.cli bench gpu "${bench[@]:0:6}" \
            --max-sessions 1 --sessions 1 --channels-last --results "$out/RESULTS.md"
        ;;
    2)
        run bench-compiled "$python" -m avatar_forcing.cli bench gpu "${bench[@]}" --compile \
            --results "$out/RESULTS.md"
        # The whole denoising loop as one graph, one session: its compile is the long one, so it goes last and
        # has its own limit (what ran before is kept whatever happens here).
        run bench-compiled-loop timeout 150 "$python" -m avatar_forcing.cli bench gpu "${bench[@]:0:6}" \
            --max-sessions 1 --sessions 1 --compile loop --results "$out/RESULTS.md"
        ;;
    *) echo "part must be 1 or 2" >&2; exit 2 ;;
esac

echo
echo "== summary (part $part)"
grep -h -E "passed|failed|error|collected" "$out/tests.log" 2>/dev/null | tail -n 1
grep -h -E "^\| (fast|reference way)|^Speed-up|^Largest|^Stage times|^\| [0-9]+ \|" "$out"/bench-*.log 2>/dev/null
exit $status
