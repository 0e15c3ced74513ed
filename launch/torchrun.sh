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
#   LOCAL_ADDR      this node's address as the others reach it (multi-node; default: torchrun's guess from the
#                   hostname, which is wrong where the hostname resolves to 127.0.0.1)
#   RDZV_CONF       extra c10d rendezvous settings, e.g. is_host=1 on the node that serves the rendezvous store
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  the network interface the ranks talk over (read by torch itself)
#   PYTHON          the interpreter that has lisa_dist installed (default: python)
# The config and overrides are passed on to `lisa-dist train` (set --backend.name there, e.g. fsdp).
# Checkpoint and stop: SIGTERM or SIGUSR1 to this script; it exits 75 once the ranks saved (relaunch to resume).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"
usage_unless_config "$0" "$@"

nproc=${NPROC_PER_NODE:-$(default_nproc)}
nnodes=${NNODES:-1}
args=(--nproc-per-node "$nproc")
if [ "$nnodes" = 1 ]; then
  args+=(--standalone)
else
  : "${MASTER_ADDR:?MASTER_ADDR (the address of node 0) is required for NNODES=$nnodes}"
  : "${NODE_RANK:?NODE_RANK (0..$((nnodes - 1))) is required for NNODES=$nnodes}"
  args+=(--nnodes "$nnodes" --node-rank "$NODE_RANK" --rdzv-backend c10d
    --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29400}" --rdzv-id "${RUN_ID:-lisa_dist}")
  if [ -n "${LOCAL_ADDR:-}" ]; then
    args+=(--local-addr "$LOCAL_ADDR")
  fi
  if [ -n "${RDZV_CONF:-}" ]; then
    args+=(--rdzv-conf "$RDZV_CONF")
  fi
fi
status=0
run_ranks "${PYTHON:-python}" -m torch.distributed.run "${args[@]}" -m lisa_dist.cli train "$@" || status=$?
exit "$status"
