#!/usr/bin/env bash
# Launch a lisa_dist run with the DeepSpeed launcher, on this node or on the nodes of a hostfile.
#
#   launch/deepspeed.sh CONFIG.yaml [--section.key=value ...]
#
# Environment knobs:
#   NPROC_PER_NODE  processes per node (default: the node's GPUs, or 2 CPU ranks)
#   DS_CONFIG       the ZeRO JSON (default: ds_configs/zero2.json)
#   HOSTFILE        a DeepSpeed hostfile, one "hostname slots=N" line per node: multi-node (unset: this node)
#   MASTER_ADDR     address of the first node (multi-node; default: the first host of HOSTFILE)
#   MASTER_PORT     rendezvous port (default: a free port on this host)
#   DS_LAUNCHER     how DeepSpeed reaches the other nodes: pdsh (default), openmpi, mvapich, slurm
# On a CPU-only machine set DS_ACCELERATOR=cpu. The config and overrides are passed on to `lisa-dist train`;
# overrides given here win over the backend settings this script adds.
# Checkpoint and stop: SIGTERM or SIGUSR1 to this script; it exits 75 once the ranks saved (relaunch to resume).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"
usage_unless_config "$0" "$@"

config=$1
shift
nproc=${NPROC_PER_NODE:-$(default_nproc)}
args=(--num_gpus "$nproc" --master_port "${MASTER_PORT:-$(free_port)}")
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}")
  args+=(--master_addr "${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}")
fi
status=0
run_ranks deepspeed "${args[@]}" --module lisa_dist.cli train "$config" \
  --backend.name=deepspeed --backend.ds_config="${DS_CONFIG:-$here/../ds_configs/zero2.json}" "$@" || status=$?
exit "$status"
