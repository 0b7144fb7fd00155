#!/usr/bin/env bash
# The GPU check of issue 23 (docs/pretrain.md "On GPUs"): sets the Python environment up, then runs
# bench/gpu.py, whose parts write $OUT/<n>-<part>.json. Exits 0 whatever happens (each part has its status).
#
#   bench/gpu.sh wheels               here, before a GPU run: the wheels the GPU machine's image lacks, into .whl/
#   bench/gpu.sh [--dry-run] [...]    run (any bench/gpu.py option: --parts, --budget, --batch, --peak-tflops ...)
#
# Environment: with a working .venv (this machine) its python and `radalign` are used. Elsewhere (the GPU machine:
# no .venv, no network, the image's python3 with a CUDA torch) the wheels in .whl/ are installed with --no-index
# into $RADALIGN_GPU_SITE (seconds), the repository goes first on PYTHONPATH, and a `radalign` command is made
# from setup.cfg's console_scripts entry. Nothing is downloaded there and nothing takes minutes.
set -u
cd "$(dirname "$0")/.." || exit 0
REPO=$PWD
# Packages radalign's pretrain, data and open_clip_train paths import that the GPU image ('cuda', package list of
# 2026-11-17 in the device tool's KINDS.md) lacks; versions pinned to the ones .venv tests with. faiss is left
# out: faiss-cpu alone cannot show GPU figures, and faiss-gpu-cu12 (48 MB, plus the CUDA 12 runtime and cuBLAS)
# does not fit the 64 MiB a device call carries.
WHEELS="open_clip_torch ftfy wcwidth webdataset braceexpand omegaconf hjson pydantic pydantic_core annotated-types
typing-inspection"
GPU_PYTHON=${GPU_PYTHON:-3.12}  # the image's python3

fetch_wheels() {
    local py=.venv/bin/python pins="" name ver
    [ -x "$py" ] || { echo "bench/gpu.sh wheels: needs .venv (make install)" >&2; return 2; }
    mkdir -p .whl
    for name in $WHEELS; do
        ver=$("$py" -c "import importlib.metadata as m; print(m.version('$name'))") || return 2
        pins="$pins $name==$ver"
    done
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins || return 2
    # deepspeed is an sdist: build its pure-Python wheel (ops are compiled at run time when used; none are here).
    ver=$("$py" -c "import importlib.metadata as m; print(m.version('deepspeed'))") || return 2
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$ver" || return 2
    ls -1 .whl
    echo "total $(du -sh .whl | cut -f1) in .whl/ (the device call carries it: carry=[\".whl\"], 64 MiB at most)"
}

setup_python() {
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, radalign" 2>/dev/null; then
        PY=$REPO/.venv/bin/python
        RADALIGN_BIN=$REPO/.venv/bin/radalign
        RADALIGN_GPU_SETUP="the repository's .venv"
        return
    fi
    PY=$(command -v python3)
    local site=${RADALIGN_GPU_SITE:-/tmp/radalign-gpu-site} entry
    mkdir -p "$site/bin"
    RADALIGN_GPU_SETUP="$PY with the repository on PYTHONPATH"
    if compgen -G ".whl/*.whl" >/dev/null; then
        if timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl; then
            RADALIGN_GPU_SETUP="$RADALIGN_GPU_SETUP, wheels from .whl/ in $site: $(cd .whl && echo *.whl)"
        else
            RADALIGN_GPU_SETUP="$RADALIGN_GPU_SETUP; installing .whl/ FAILED (see the log)"
        fi
    else
        RADALIGN_GPU_SETUP="$RADALIGN_GPU_SETUP; no .whl/ (run 'bench/gpu.sh wheels' here and carry .whl)"
    fi
    # The console script pip writes for setup.cfg's `radalign = radalign.cli:main`, its __main__ guard included:
    # worker processes started by spawn or forkserver (data prepare's pool) import it again and must not run it.
    entry=$(sed -n 's/^ *radalign *= *\([A-Za-z0-9_.]*\):\([A-Za-z0-9_]*\) *$/\1 \2/p' setup.cfg | head -1)
    set -- $entry
    printf '#!%s\nimport sys\nfrom %s import %s\nif __name__ == "__main__":\n    sys.exit(%s())\n' \
        "$PY" "$1" "$2" "$2" >"$site/bin/radalign"
    chmod +x "$site/bin/radalign"
    RADALIGN_BIN=$site/bin/radalign
    export PYTHONPATH="$REPO:$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
}

if [ "${1:-}" = wheels ]; then
    fetch_wheels
    exit $?
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
kind=gpu
for arg in "$@"; do [ "$arg" = --dry-run ] && kind=gpu-dry; done
export OUT=${OUT:-$REPO/bench/out/$kind}
mkdir -p "$OUT"
setup_python
export RADALIGN_BIN RADALIGN_GPU_SETUP
echo "bench/gpu.sh: $RADALIGN_GPU_SETUP; results in $OUT" | tee "$OUT/gpu-log.txt"
"$PY" bench/gpu.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu-log.txt"
exit 0
