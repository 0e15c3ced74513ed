"""A real one-node SLURM cluster on localhost (munged, slurmctld, slurmd as root in a temp folder), for tests.

`local_slurm(folder)` starts it, waits until the node is idle, and always tears it down: every job cancelled and the
queue empty before slurmd stops (else an orphaned slurmstepd is left that ignores SIGTERM), then the daemons stopped
by their pid files. Ports and the first job id are random, so two clusters (two test sessions) can share a machine.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo", "srun")
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)

SLURM_CONF = """\
ClusterName=lisatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
MailProg=/bin/true
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` (there is no sacct here); cancelled ones die quickly.
MinJobAge=300
KillWait=5
FirstJobId={first_job_id}
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    """A free port below the ephemeral range, where the OS never hands one out to another process's socket."""
    while True:
        port = random.randrange(10000, 20000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path.name} missing)"


@dataclass
class Cluster:
    """A running local cluster: submit, watch and signal jobs. Job output lands in <root>/jobs/slurm-<id>.out."""

    root: Path
    env: dict[str, str]
    """The environment for SLURM commands (SLURM_CONF set, no SLURM_* of an outer job)."""

    def run(
        self, *cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=self._env(env), cwd=cwd or self.root
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def _env(self, env: dict[str, str] | None) -> dict[str, str]:
        merged = {k: v for k, v in (env or self.env).items() if not k.startswith("SLURM_")}
        return merged | {"SLURM_CONF": self.env["SLURM_CONF"]}

    def sbatch(self, script: str | Path, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit from <root>/jobs (where slurm-%j.out lands) with `env` as the job's environment; the job id."""
        return self.run("sbatch", "--parsable", str(script), *args, env=env, cwd=self.root / "jobs").stdout.strip()

    def show(self, job_id: str) -> dict[str, str]:
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def state(self, job_id: str) -> str:
        return self.show(job_id)["JobState"]

    def wait(self, job_id: str, timeout: float, until: frozenset[str] = FINAL_STATES) -> str:
        """Poll until the job's state is in `until` or final; that state. TimeoutError with the job's output."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state in until or state in FINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout:.0f} s; output:\n{self.output(job_id)[-4000:]}"
                )
            time.sleep(0.5)

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """Signal the batch shell only, as SLURM does for --signal=B:SIG@T before the time limit."""
        self.run("scancel", "-b", "-s", sig, job_id)

    def output(self, job_id: str) -> str:
        path = Path(self.show(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.exists() else ""

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job and wait for an empty queue (no slurmstepd left)."""
        jobs = self.run("squeue", "-h", "-o", "%i").stdout.split()
        if jobs:
            self.run("scancel", *jobs)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i").stdout.split():
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still queued {timeout:.0f} s after scancel:\n{self.run('squeue').stdout}")
            time.sleep(0.5)


def _daemon(name: str) -> str | None:
    # Debian puts the daemons in /usr/sbin, which a test runner's PATH may lack.
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def _find_daemons() -> dict[str, str]:
    """The daemons' paths; skips the test when SLURM, munge or root is missing."""
    daemons = {name: _daemon(name) for name in DAEMONS}
    missing = [name for name, path in daemons.items() if path is None]
    missing += [name for name in COMMANDS if shutil.which(name) is None]
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} missing: apt-get install slurm-wlm munge; .ci/run does)"
        )
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (munged, slurmd)")
    return {name: str(path) for name, path in daemons.items()}


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen, pid_file: Path) -> None:
    """SIGTERM the pid in the daemon's pid file (our child's, used directly while the daemon has written no pid file);
    SIGKILL our child if it lingers."""
    if proc.poll() is None:
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = proc.pid
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def _wait_for(
    what: str, ready: Callable[[], bool], root: Path, daemons: list[subprocess.Popen], timeout: float = 30
) -> None:
    """Poll `ready`; fail with the daemons' logs on timeout or as soon as one of them has exited."""
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [" ".join(map(str, d.args[:1])) for d in daemons if d.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(
                f"--- {name}:\n{_tail(root / name)}"
                for name in ("munged.log", "slurmctld.log", "slurmd.log", "daemons.out")
            )
            why = f"{', '.join(dead)} exited" if dead else f"not ready after {timeout:.0f} s"
            raise RuntimeError(f"local SLURM cluster: waiting for {what}: {why}\n{logs}")
        time.sleep(0.2)


def _write_conf(root: Path, host: str, munge_socket: Path) -> Path:
    for sub in ("state", "spool", "jobs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    # The batch scripts derive their rendezvous port from the job id (20000 + id % 20000): a random first id keeps
    # two clusters on one machine apart, and below 9000 the ports stay out of the ephemeral range and off 29500.
    conf.write_text(
        SLURM_CONF.format(
            host=host,
            root=root,
            munge_socket=munge_socket,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            first_job_id=random.randrange(1, 9000),
        )
    )
    return conf


@contextmanager
def local_slurm(folder: Path) -> Iterator[Cluster]:
    """A one-node cluster (this host, 2 CPUs, partition `debug`) with its files under `folder`; skips the test when
    SLURM or root is missing."""
    bin_ = _find_daemons()
    root = Path(folder).resolve()
    host = socket.gethostname().split(".")[0]
    log = root / "daemons.out"
    with ExitStack() as stack:
        # munged wants execute permission for all on the socket's folder and on every folder above it ("Socket is
        # inaccessible"), which pytest's 0700 temp folders lack: the socket gets a 0711 folder of its own in /tmp.
        munge_dir = Path(tempfile.mkdtemp(prefix="lisa-munge-"))
        stack.callback(shutil.rmtree, munge_dir, ignore_errors=True)
        munge_dir.chmod(0o711)
        sock = munge_dir / "munge.socket.2"
        conf = _write_conf(root, host, sock)
        cluster = Cluster(
            root, {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"SLURM_CONF": str(conf)}
        )
        key = root / "munge.key"
        subprocess.run([bin_["mungekey"], "--create", f"--keyfile={key}"], check=True, capture_output=True)
        munged = _start(
            [
                bin_["munged"],
                "-F",
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={root / 'munged.pid'}",
                f"--log-file={root / 'munged.log'}",
                f"--seed-file={root / 'munged.seed'}",
            ],
            log,
        )
        stack.callback(_stop, munged, root / "munged.pid")
        _wait_for("munged", sock.exists, root, [munged])
        ctld = _start([bin_["slurmctld"], "-D", "-f", str(conf)], log)
        stack.callback(_stop, ctld, root / "slurmctld.pid")
        slurmd = _start([bin_["slurmd"], "-D", "-f", str(conf), "-N", host], log)
        stack.callback(_stop, slurmd, root / "slurmd.pid")
        # Runs first on exit: no job may outlive slurmd.
        stack.callback(cluster.cancel_all)

        def idle() -> bool:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=cluster.env)
            return proc.stdout.split() == ["idle"]

        _wait_for("the node (sinfo idle)", idle, root, [munged, ctld, slurmd])
        yield cluster
