#!/usr/bin/env bash
# Shared by the launch scripts (sourced, not run): their usage line, process-count and port defaults, and running
# the launcher so that a signal to the script checkpoints and stops the ranks and the script exits 75 when they did.

# Print the comment block at the top of the calling script (its usage and knobs) and exit 2 when no config is given.
usage_unless_config() {
  local script=$1
  shift
  if [ $# -lt 1 ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$script" >&2
    exit 2
  fi
}

# Processes per node: every GPU, else 2 CPU ranks.
default_nproc() {
  "${PYTHON:-python}" -c "import torch; print(torch.cuda.device_count() or 2)"
}

# A TCP port the OS reports free on this host.
free_port() {
  "${PYTHON:-python}" -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
}

# The lisa_dist ranks among the descendants of process $1 (on this node).
rank_pids() {
  local pid child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    if tr '\0' ' ' <"/proc/$child/cmdline" 2>/dev/null | grep -q 'lisa_dist.cli'; then
      echo "$child"
    fi
    rank_pids "$child"
  done
}

# Run a launcher command ("$@") in the background and wait for it.
# - SIGTERM, SIGUSR1, SIGHUP or Ctrl-C (SIGINT) to this script go to the ranks as SIGUSR1: they finish the step, save a
#   checkpoint and stop; ranks on other nodes learn of it at the same step (one signaled rank is enough). The
#   launcher itself is not signaled: torchrun would give its workers only a fixed grace before SIGKILL, the
#   deepspeed launcher none. It runs in a session of its own, so a terminal's Ctrl-C reaches this script alone
#   (torchrun would otherwise tear its workers down at once). A second Ctrl-C stops the ranks at once.
# - The script exits 75 when the ranks stopped that way, and with the ranks' own status when they failed (2 bad
#   input, 5 a checkpoint not written, ...), although the launcher reports any failed rank as 1, so that a requeue
#   keyed on the exit status (SLURM, a workflow engine) sees a preemption, not a failure.
run_ranks() {
  local status_dir status child interrupts=0
  status_dir=$(mktemp -d "${TMPDIR:-/tmp}/lisa_dist_status.XXXXXX")
  export LISA_DIST_STATUS_DIR=$status_dir
  setsid "$@" &
  child=$!
  # shellcheck disable=SC2317  # run by the trap
  forward() {
    echo "lisa_dist: caught $1: the ranks checkpoint and stop" >&2
    local pid
    for pid in $(rank_pids "$child"); do kill -USR1 "$pid" 2>/dev/null || true; done
  }
  # shellcheck disable=SC2317  # run by the trap
  interrupt() {
    interrupts=$((interrupts + 1))
    if [ "$interrupts" = 1 ]; then
      forward INT
      echo "lisa_dist: Ctrl-C again stops the ranks at once, without a checkpoint" >&2
      return 0  # a bare return in a trap returns the interrupted wait's 130, which set -e turns into an exit
    fi
    echo "lisa_dist: a second Ctrl-C: stopping the ranks now" >&2
    local pid
    for pid in $(rank_pids "$child") "$child"; do kill -KILL "$pid" 2>/dev/null || true; done
  }
  trap 'forward TERM' TERM
  trap 'forward USR1' USR1
  trap 'forward HUP' HUP  # the terminal closed: the launcher, in its own session, would not hear of it
  trap interrupt INT
  while :; do
    status=0
    wait "$child" || status=$?
    # A trapped signal ends `wait` early (status > 128) while the launcher runs on: wait again.
    if [ "$status" -le 128 ] || ! kill -0 "$child" 2>/dev/null; then break; fi
  done
  if [ "$status" -gt 128 ]; then  # interrupted just as it ended: its own status, if not collected yet
    local again=0
    wait "$child" 2>/dev/null || again=$?
    if [ "$again" != 127 ]; then status=$again; fi
  fi
  trap - TERM USR1 HUP INT
  if [ -e "$status_dir/preempted" ]; then
    status=75
  elif [ "$status" != 0 ]; then  # the ranks' own status (lisa_dist.cli marks it): the cause before its effects
    local code
    for code in 2 5 3 4 130; do
      if [ -e "$status_dir/exit-$code" ]; then status=$code; break; fi
    done
  fi
  rm -rf "$status_dir"
  return "$status"
}
