#!/usr/bin/env bash
# Launch a lisa_dist run with torchrun, on one node or as one node of a multi-node job (c10d rendezvous).
#
#   launch/torchrun.sh CONFIG.yaml [--section.key=value ...]
#
# Environment knobs:
#   NPROC_PER_NODE  processes per node (default: the node's GPUs, or 2 CPU ranks)
#   NNODES          nodes in the job (default 1: a standalone single-node run)
#   NODE_RANK       this node's index, 0..NNODES-1 (multi-node)
#   MASTER_ADDR     address of node 0, where the rendezvous store lives (multi-node)
#   MASTER_PORT     rendezvous port (multi-node; default 29400)
#   RUN_ID          rendezvous id shared by all nodes of the job (default: lisa_dist)
# The config and overrides are passed on to `lisa-dist train` (set --backend.name there, e.g. fsdp).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"

if [ $# -lt 1 ]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
nproc=${NPROC_PER_NODE:-$(default_nproc)}
nnodes=${NNODES:-1}
if [ "$nnodes" = 1 ]; then
  exec torchrun --standalone --nproc-per-node "$nproc" -m lisa_dist.cli train "$@"
fi
: "${MASTER_ADDR:?MASTER_ADDR (the address of node 0) is required for NNODES=$nnodes}"
: "${NODE_RANK:?NODE_RANK (0..$((nnodes - 1))) is required for NNODES=$nnodes}"
exec torchrun --nnodes "$nnodes" --node-rank "$NODE_RANK" --nproc-per-node "$nproc" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29400}" --rdzv-id "${RUN_ID:-lisa_dist}" \
  -m lisa_dist.cli train "$@"
