#!/usr/bin/env bash
# Train for a fixed time on a machine that files are copied to and from (a rented or lent GPU with no
# shared disk): resume a carried state export, train until the time limit, and write the new state in
# pieces small enough to copy back.
#
#   bash recipes/remote_train.sh CONFIG STATE TIME_LIMIT OUT [section.key=value ...]
#
#   CONFIG      a training config, e.g. recipes/configs/default-phase-gpu.yml
#   STATE       a state export (python recipes/train.py --save-path RUN --export-state FILE), or its
#               pieces FILE.part-* (joined here), or "none" to start the run from scratch
#   TIME_LIMIT  the training budget (90s, 8m, 1.5h): the run stops and saves in time, then exports
#   OUT         folder for the results: state.safetensors.part-00, -01, ... (15 MiB each; join them with
#               `cat OUT/state.safetensors.part-* > state.safetensors`), metrics.jsonl, train.log
#
# Where soundfile, soxr or pyloudnorm is missing, the wheels in .whl/ are installed into /tmp/site
# first (machines without a package index).
# Set RUN to keep the run folder somewhere else than /tmp/remote-run. Continue the run anywhere with
#   python recipes/train.py --config CONFIG --save-path RUN2 --resume-from state.safetensors
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,18p' "$0" >&2
    exit 2
fi
config=$1 state=$2 limit=$3 out=$4
shift 4
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if ! python3 -c "import soundfile, soxr, pyloudnorm" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run=${RUN:-/tmp/remote-run}
mkdir -p "$out"
resume=()
if [ "$state" != none ]; then
    if [ ! -f "$state" ] && compgen -G "$state.part-*" > /dev/null; then
        cat "$state".part-* > /tmp/remote-state.safetensors
        state=/tmp/remote-state.safetensors
    fi
    resume=(--resume-from "$state")
fi

status=0
python3 recipes/train.py --config "$config" --save-path "$run" --time-limit "$limit" "${resume[@]}" "$@" \
    2>&1 | tee "$out/train.log" || status=$?
cp "$run/metrics.jsonl" "$out/" 2>/dev/null || true
python3 recipes/train.py --save-path "$run" --export-state "$run/state.safetensors"
split -b 15M -d "$run/state.safetensors" "$out/state.safetensors.part-"
ls -l "$out"
exit "$status"
