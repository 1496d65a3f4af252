#!/usr/bin/env bash
# One run on a GPU machine without internet: the CUDA tests (tests/test_gpu.py), then the H100
# capture benchmark (bench/gpu_capture.py: LLaVA-1.5-7B and Qwen3-VL-30B-A3B shapes and the causal
# sweep).  The machine's image has torch, pytest, numpy, scipy, tensorstore, xarray; the rest of
# gap's needs travel as wheels in .whl/ (git-ignored):
#
#   bash bench/device_check.sh --download     # here, where pip reaches PyPI
#   bash bench/device_check.sh                # there, from the repository root, .whl carried along
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(nnsight==0.8.1 transformers==5.24.0 pydantic==2.14.4 pydantic-core annotated-types
        typing-inspection typing-extensions google-crc32c greenlet websocket-client zstandard
        zarr==3.1.6 numcodecs==0.16.6 donfig dask==2026.8.0 partd locket xarray==2026.9.0)
if [[ "${1:-}" == --download ]]; then
    platforms=()
    for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
        platforms+=(--platform "${p}_x86_64")
    done
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --platform any -d .whl "${WHEELS[@]}"
    exit
fi
# Every step has its own time limit inside one overall budget (DEVICE_BUDGET_S, default 540 s), so
# a hang in one step still leaves the others their figures; the log is also kept in $OUT.
budget=${DEVICE_BUDGET_S:-540}
exec > >(tee "${OUT:-/tmp}/device_check.log") 2>&1
left() { echo $(( budget - SECONDS )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import sys, torch, transformers, nnsight, zarr; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
            'transformers', transformers.__version__, 'nnsight', nnsight.__version__, 'zarr', zarr.__version__)"
status=0
step() {  # step SECONDS COMMAND...: run with a limit of SECONDS (or what is left, if less)
    local limit=$(( $1 < $(left) ? $1 : $(left) )); shift
    if (( limit < 30 )); then echo "## skipped, no time left: $*"; status=1; return; fi
    echo "## $* (limit ${limit} s, ${SECONDS} s elapsed)"
    timeout "$limit" "$@" || { rc=$?; echo "## exit $rc: $*"; status=1; }
}
step 180 python3 -m pytest -q -rs --durations=10 -m gpu tests/test_gpu.py -p no:cacheprovider
step 360 python3 -m bench.gpu_capture --no-causal  # ~250 s on an H200: a spawned encoder process per timed run
step 600 python3 -m bench.gpu_capture --only causal
echo "## done in ${SECONDS} s"
exit $status
