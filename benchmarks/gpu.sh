#!/usr/bin/env bash
# The benchmark set on one CUDA GPU in about 10 minutes: full fine-tuning, LoRA, QLoRA, naive LISA, BAdam and
# lisa_dist LISA (fp32, int8 and NF4 frozen layers, and lean: NF4 + frozen embeddings + 8-bit Adam + chunked loss,
# each next to the planner's figure) on Llama-shaped models of 1B and 3B params (SIZES="1b 3b 7b" for more), bf16 compute, activation
# checkpointing; peak memory from torch.cuda.max_memory_allocated and tokens/s; a method that does not fit is
# reported as out of memory. Then the per-backend switch overhead on one rank, and the report.
#
#   benchmarks/gpu.sh                 # results in a fresh benchmarks/results/<date>_<hardware>_gpu/
#   PYTHON=/path/to/python OUT=dir SIZES="1b 3b" STEPS=12 benchmarks/gpu.sh
#
# Needs a Python whose torch sees CUDA, with this repo installed (pip install -e '.[all]'); it never installs torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SIZES=${SIZES:-"1b 3b"}
STEPS=${STEPS:-12}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} HF_HUB_OFFLINE=1

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: $PYTHON has no CUDA device (torch.cuda.is_available() is False)" >&2
    exit 2
fi
OUT=${OUT:-$("$PYTHON" -m benchmarks.harness reserve gpu)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>/dev/null || true
for size in $SIZES; do
    # Each method runs in its own process; 4 minutes at most per size.
    timeout 230 "$PYTHON" -m benchmarks.methods --device cuda --precision bf16 --size "$size" --steps "$STEPS" \
        --seq-len 1024 --micro-batch 2 --activation-checkpointing --out "$OUT" --name "methods_$size" \
        || echo "size $size: did not finish (exit $?)"
done
timeout 60 "$PYTHON" -m benchmarks.requant_cost --out "$OUT" || echo "requant cost: did not finish (exit $?)"
timeout 90 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m benchmarks.switch_overhead \
    --steps 15 --out "$OUT" || echo "switch overhead: did not finish (exit $?)"
"$PYTHON" -m benchmarks.report --results "$OUT"
