#!/usr/bin/env bash
# The GPU check in one call on a machine whose python3 has CUDA torch but no registry: installs the wheels that
# `python -m benchmarks.gpu_kit.prepare` put in .gpu_kit/wheels (pip --no-index --no-deps --target, beside the system's
# packages, nothing replaced), then runs every stage of `python -m benchmarks.gpu_kit.check`. Results in OUT (default
# a fresh benchmarks/results/<date>_<hardware>_gpu_kit): results.jsonl, check.log, machine.json, summary.md.
#
#   benchmarks/gpu_kit/check.sh [benchmarks.gpu_kit.check arguments: --budget-s 450, --stages local zero2, ...]
#   OUT=dir PYTHON=python3 benchmarks/gpu_kit/check.sh
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$("$PYTHON" -m benchmarks.harness reserve gpu_kit)}
WHEELS=${WHEELS:-.gpu_kit/wheels}
SITE=${SITE:-/tmp/lisa_dist_gpu_kit_site}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    # Installed each run into a fresh folder; the repo and that folder come first on the path.
    rm -rf "$SITE"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl > "$OUT/install.log" 2>&1; then
        echo "gpu_kit: installing $WHEELS failed (see $OUT/install.log); the stages run with what is installed" >&2
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_kit: no wheels in $WHEELS (run python -m benchmarks.gpu_kit.prepare where a registry is reachable)" >&2
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
exec "$PYTHON" -m benchmarks.gpu_kit.check --device cuda --out "$OUT" --work "${WORK:-/tmp/lisa_dist_gpu_kit_work}" "$@"
