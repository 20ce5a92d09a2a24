#!/usr/bin/env bash
# Every CUDA test and GPU benchmark of the project in one run, on a GPU machine's own Python.
#
#   bench/gpu_suite.sh [--dry] [--python PY] [--out DIR]    # run the suite (goal: under 8 min)
#   bench/gpu_suite.sh --fetch-wheels                        # here, once: wheels for the machine
#
# The machine brings torch, transformers and safetensors; what else the steps import (numpy,
# pillow, shapely, sentencepiece, gguf, pytest) is installed, when missing, from the wheels in
# bench/.cache/wheels (--fetch-wheels downloads them for CPython 3.10-3.12 on manylinux x86_64,
# refused above 60 MiB) into a folder of this run, never into the machine's Python.
# Steps (time limits 120 + 180 + 120 + 50 s; a failed step is reported and the next runs):
#   1. cuda-tests     the tests that exercise CUDA (tests/unit/test_geopixel_cuda.py)
#   2. geopixel       GeoPixel at GeoPixel-7B's sizes in bfloat16, random weights: tiles per
#                     minute at batch 1 against batched (bench/geopixel_gpu.py)
#   3. geochat        the transformers backend batched against batch-1 generate at GeoChat-7B's
#                     sizes (bench/gpu_throughput.py)
#   4. encoder        GeoChat's torch image encoder, CPU against CUDA (bench/vision_encoder.py)
# --dry runs the same steps on the CPU at tiny sizes (checks the suite; measures nothing).
# Output: one log per step and summary.txt (seconds per step, each step's last lines) in --out.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT="$ROOT/out/gpu_suite"
DRY=0
WHEELS="$ROOT/bench/.cache/wheels"
EXTRA_PACKAGES=(pillow shapely sentencepiece gguf pytest)  # numpy comes with transformers
EXTRA_MODULES=(numpy PIL shapely sentencepiece gguf pytest)

fetch_wheels() {
    mkdir -p "$WHEELS"
    for version in 3.10 3.11 3.12; do
        "$PY" -m pip download --quiet --only-binary=:all: --python-version "$version" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux_2_28_x86_64 --no-deps -d "$WHEELS" \
            "${EXTRA_PACKAGES[@]}" pluggy iniconfig packaging || return 1
    done
    local mib
    mib=$(du -sm "$WHEELS" | cut -f1)
    echo "wheels in $WHEELS: ${mib} MiB"
    if [ "$mib" -gt 60 ]; then
        echo "more than 60 MiB: they would not travel to the GPU machine (64 MiB with the tree)"
        return 1
    fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry) DRY=1 ;;
        --python) PY=$2; shift ;;
        --out) OUT=$2; shift ;;
        --fetch-wheels) fetch_wheels; exit $? ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)"; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# ------------------------------------------------------------------ the machine's Python
if ! "$PY" -c "import torch, transformers, safetensors" 2>/dev/null; then
    say "$PY lacks torch, transformers or safetensors: this suite runs on a machine that has them"
    exit 2
fi
missing=$("$PY" - "${EXTRA_MODULES[@]}" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
SITE="$OUT/site"
if [ -n "$missing" ]; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        say "installing from bench/.cache/wheels into $SITE: $missing"
        packages=$(echo "$missing" | sed 's/\bPIL\b/pillow/')
        # shellcheck disable=SC2086
        "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$SITE" \
            $packages pluggy iniconfig packaging >> "$OUT/install.log" 2>&1 \
            || say "pip could not install every wheel (see install.log)"
    else
        say "missing $missing and no wheels in bench/.cache/wheels: steps needing them fail"
    fi
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
"$PY" - <<'EOF' | tee -a "$SUMMARY"
import platform, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, CUDA {torch.version.cuda}, GPU: {gpu}")
EOF
if [ "$DRY" = 1 ]; then
    export GEOCHAT_TEST_DEVICE=cpu
    say "dry run: every step on the CPU at tiny sizes (figures mean nothing)"
else
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        say "torch sees no CUDA GPU here: run with --dry to check the suite on the CPU"
        exit 2
    fi
    export GEOCHAT_TEST_DEVICE=cuda
fi

# ------------------------------------------------------------------ the steps
failed=0
step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local seconds=$(( $(date +%s) - start ))
    if [ "$rc" = 0 ]; then
        say "== $name: ok in $seconds s"
    else
        failed=$((failed + 1))
        say "== $name: FAILED (exit $rc$([ "$rc" = 124 ] && echo ', over its time limit')) after $seconds s"
    fi
    tail -n 12 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$SUMMARY"
}

SUITE_START=$(date +%s)
step cuda-tests "$([ "$DRY" = 1 ] && echo 400 || echo 120)" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/unit/test_geopixel_cuda.py
if [ "$DRY" = 1 ]; then
    step geopixel 300 "$PY" bench/geopixel_gpu.py --dry
    step geochat 200 "$PY" bench/gpu_throughput.py --smoke --batch-size 2 --tiles 4 \
        --single-tiles 2 --new-tokens 8
    step encoder 200 "$PY" bench/vision_encoder.py --no-libmtmd --tiles 1 --repeats 1
else
    step geopixel 180 "$PY" bench/geopixel_gpu.py
    step geochat 120 "$PY" bench/gpu_throughput.py --batch-size 16 --tiles 32 --single-tiles 4 \
        --new-tokens 100
    step encoder 50 "$PY" bench/vision_encoder.py --no-libmtmd --gpu --tiles 2 --repeats 1
fi
total=$(( $(date +%s) - SUITE_START ))
say "suite: $((4 - failed)) of 4 steps ok in $total s (goal: under 480 s)"
[ "$failed" = 0 ]
