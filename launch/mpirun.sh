#!/usr/bin/env bash
# Launch a lisa_dist run with mpirun (one process per GPU, or N CPU ranks); lisa_dist bootstraps from MPI itself.
#
#   launch/mpirun.sh CONFIG.yaml [--section.key=value ...]
#
# Environment knobs:
#   NPROC           total processes (default: the node's GPUs, or 2 CPU ranks)
#   HOSTFILE        an MPI hostfile for several nodes (unset: this node)
#   MPIRUN          the mpirun to use (default: mpirun on PATH; the `mpich` wheel provides one)
#   MPIRUN_ARGS     extra arguments for mpirun (e.g. binding options), split on spaces
#   MASTER_ADDR     address rank 0 advertises to the others (default: its hostname's address)
#   PYTHON          the interpreter every rank runs (default: python)
# Rank 0 picks a free port and broadcasts it, so jobs sharing a node never clash. OMP_NUM_THREADS defaults to 1
# (mpirun, unlike torchrun, does not set it). The config and overrides are passed on to `lisa-dist train`.
# Checkpoint and stop: SIGTERM or SIGUSR1 to this script; it exits 75 once the ranks saved (relaunch to resume).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"
usage_unless_config "$0" "$@"

args=(-n "${NPROC:-$(default_nproc)}")
if [ -n "${HOSTFILE:-}" ]; then
  args+=(-hostfile "$HOSTFILE")
fi
read -r -a extra <<< "${MPIRUN_ARGS:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
status=0
run_ranks "${MPIRUN:-mpirun}" "${args[@]}" "${extra[@]}" "${PYTHON:-python}" -m lisa_dist.cli train "$@" || status=$?
exit "$status"
