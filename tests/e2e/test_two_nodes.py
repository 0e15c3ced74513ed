"""Two "nodes" on one machine: network namespaces joined by a veth pair, one launch/torchrun.sh per node with c10d
rendezvous across them, against one node with 2 ranks. Needs root and iproute2; skips with the reason otherwise."""

import os
import subprocess

import pytest

from lisa_dist.run import read_jsonl

from ..helpers import REPO, free_port, launcher_env, run_launcher, tiny_overrides, write_text_data

SUBNET = "10.231.77"  # exists only inside the two namespaces this test creates


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_namespaces():
    tag = f"ld{os.getpid() % 100000}"
    names = [f"{tag}a", f"{tag}b"]
    try:
        ip("netns", "add", names[0])
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot create network namespaces here (needs root and iproute2): {exc}")
    try:
        ip("netns", "add", names[1])
        ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for i, (ns, dev) in enumerate(zip(names, (f"{tag}va", f"{tag}vb"), strict=True)):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield [
            (ns, dev, f"{SUBNET}.{i + 1}")
            for i, (ns, dev) in enumerate(zip(names, (f"{tag}va", f"{tag}vb"), strict=True))
        ]
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.slow  # 26 s on 2 cores: make test-slow
def test_two_nodes_train_like_one(tmp_path, two_namespaces):
    data = write_text_data(tmp_path / "text.jsonl")
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    script = str(REPO / "launch" / "torchrun.sh")
    one = tmp_path / "one"
    run_launcher(
        ["bash", script, str(config), *tiny_overrides(one, data, "--backend.name=fsdp")], env={"NPROC_PER_NODE": "2"}
    )
    two = tmp_path / "two"
    port = str(free_port())
    head = two_namespaces[0][2]
    procs = []
    for rank, (ns, dev, addr) in enumerate(two_namespaces):
        # The three settings STACK.md found: who hosts the store, each node's own address, gloo's interface.
        env = launcher_env() | {
            "NNODES": "2",
            "NODE_RANK": str(rank),
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": head,
            "MASTER_PORT": port,
            "RUN_ID": f"two-{port}",
            "LOCAL_ADDR": addr,
            "RDZV_CONF": f"is_host={int(rank == 0)}",
            "GLOO_SOCKET_IFNAME": dev,
        }
        procs.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "bash",
                    script,
                    str(config),
                    *tiny_overrides(two, data, "--backend.name=fsdp"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=REPO,
            )
        )
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    expected = read_jsonl(one / "run" / "metrics.jsonl")
    got = read_jsonl(two / "run" / "metrics.jsonl")
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
    assert [r["active_layers"] for r in got] == [r["active_layers"] for r in expected]
