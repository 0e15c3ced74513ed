"""FSDP against HSDP on two "nodes" of 2 ranks, with LISA and with full fine-tuning: tokens/s and bytes per step.

    python -m benchmarks.multinode [--steps 12] [--warmup 2] [--rate 1gbit] [--out benchmarks/results]

Needs root and iproute2 (prints "skipped: ..." and exits 0 without them). The two nodes are network namespaces
joined by a veth pair whose both ends are limited with `tc qdisc ... tbf` to `--rate` (this kernel has no netem, so
no added delay). Per config, one torchrun per namespace with c10d rendezvous across them, with the settings
launch/torchrun.sh takes from NNODES, NODE_RANK, MASTER_ADDR, LOCAL_ADDR and RDZV_CONF (is_host=1 on the first node)
plus GLOO_SOCKET_IFNAME=<its veth>, runs this file's `measure` role:

    torchrun ... -m benchmarks.multinode measure OUT.json WARMUP_STEPS [--section.key=value ...]

which trains with lisa_dist's FSDP backend, counts every step's collectives with benchmarks.lib.comm, and has rank 0
write the raw per-rank, per-step figures and the link counters of the two nodes (veth: inter-node, lo: intra-node).
The driver summarizes them into <date>_<hardware>_multinode.json and .md under --out, and deletes the namespaces
at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "lisa_dist" / "assets" / "demo_alpaca.jsonl"
SUBNET = "10.231.78"  # exists only inside the two namespaces this benchmark creates
NPROC = 2
INTERVAL = 5
CONFIGS = {  # name -> (HSDP replicas, LISA on)
    "FSDP full": (1, False),
    "FSDP LISA": (1, True),
    "HSDP full": (2, False),
    "HSDP LISA": (2, True),
}


def overrides(name: str, steps: int, run_dir: Path) -> list[str]:
    replicate, lisa = CONFIGS[name]
    return [
        f"--data.path={DATA}",
        "--data.format=alpaca",
        "--data.max_length=512",
        "--data.skip_bad_rows=true",
        f"--data.cache_dir={run_dir.parent / 'cache'}",
        "--model.name=tiny-llama",
        "--model.config_overrides={hidden_size: 256, intermediate_size: 768, num_hidden_layers: 8}",
        "--train.micro_batch_size=4",
        f"--train.steps={steps}",
        f"--train.output_dir={run_dir / 'run'}",
        "--logging.progress=false",
        "--logging.level=WARNING",
        "--backend.name=fsdp",
        f"--backend.replicate={replicate}",
        f"--lisa.enabled={str(lisa).lower()}",
        "--lisa.gamma=2",
        f"--lisa.interval={INTERVAL}",
    ]


# --- measure: one rank of one config, under torchrun ---------------------------------------------------------------


def link_tx_bytes() -> dict[str, int]:
    """Bytes sent so far by this namespace's veth (to the other node) and loopback (between this node's ranks)."""
    devices = {"veth": os.environ["GLOO_SOCKET_IFNAME"], "lo": "lo"}
    return {k: int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text()) for k, dev in devices.items()}


def measure(out: Path, args: list[str], warmup: int) -> None:
    import torch
    import torch.distributed as dist

    from benchmarks.lib import count_collectives
    from lisa_dist.config import load_config
    from lisa_dist.run import build, train_step

    run = build(load_config(None, args))
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    steps, wire = [], {}
    for step in range(run.cfg.train.steps):
        if step == warmup:
            dist.barrier()
            wire = link_tx_bytes()
        tokens, switches, start = run.tokens_seen, run.switches, time.perf_counter()
        with count_collectives() as comm:
            train_step(run, step)
        steps.append(
            {
                "s": time.perf_counter() - start,
                "tokens": run.tokens_seen - tokens,
                "switched": run.switches > switches,
                **comm.by_node(per_node),
                "bytes": comm.bytes,
                "groups": {",".join(map(str, g)): b for g, b in comm.by_group().items()},
            }
        )
    dist.barrier()
    end = link_tx_bytes()
    mine = {
        "rank": run.backend.rank,
        "node": run.backend.rank // per_node,
        "steps": steps,
        "wire": {k: end[k] - wire[k] for k in end} if int(os.environ["LOCAL_RANK"]) == 0 else None,
    }
    ranks: list = [None] * run.backend.world_size
    dist.all_gather_object(ranks, mine)
    if run.backend.is_main:
        out.write_text(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "world": run.backend.world_size,
                    "ranks_per_node": per_node,
                    "warmup": warmup,
                    "params": run.trainable.num_params(tuple(range(run.layout.num_layers))),
                    "ranks": ranks,
                }
            )
        )
    run.backend.close()


# --- drive: namespaces, the four configs, the summary --------------------------------------------------------------


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NoNamespaces(RuntimeError):
    """Network namespaces cannot be made here."""


@contextlib.contextmanager
def two_namespaces(rate: str | None) -> Iterator[tuple[list[tuple[str, str, str]], str]]:
    """Two namespaces joined by a veth pair: yields [(namespace, veth, address)] and how the link is shaped."""
    tag = f"lm{os.getpid() % 100000}"
    names, devs = [f"{tag}a", f"{tag}b"], [f"{tag}va", f"{tag}vb"]
    try:
        ip("netns", "add", names[0])
    except (OSError, subprocess.CalledProcessError) as exc:
        raise NoNamespaces(getattr(exc, "stderr", None) or str(exc)) from exc
    try:
        ip("netns", "add", names[1])
        ip("link", "add", devs[0], "type", "veth", "peer", "name", devs[1])
        nodes = []
        for i, (ns, dev) in enumerate(zip(names, devs, strict=True)):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            nodes.append((ns, dev, f"{SUBNET}.{i + 1}"))
        yield nodes, shape_link(nodes, rate)
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def shape_link(nodes: list[tuple[str, str, str]], rate: str | None) -> str:
    if not rate:
        return "veth pair, not shaped"
    qdisc = ["tbf", "rate", rate, "burst", "64kb", "latency", "50ms"]
    try:
        for ns, dev, _ in nodes:
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *qdisc],
                check=True,
                capture_output=True,
                text=True,
            )
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"warning: link left unshaped, tc failed: {getattr(exc, 'stderr', exc)}", file=sys.stderr)
        return "veth pair, not shaped (tc failed)"
    return f"veth pair, `tc qdisc add dev <veth> root {' '.join(qdisc)}` on both ends, no added delay"


def launch(nodes: list[tuple[str, str, str]], name: str, steps: int, warmup: int, timeout: int) -> dict:
    """Both nodes' torchrun for one config; returns the JSON its rank 0 wrote."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # the namespaces are fresh: any port is free there
    run_dir = REPO / "runs" / "bench_multinode" / name.replace(" ", "_")
    result = run_dir / "rank0.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = []
    for rank, (ns, dev, addr) in enumerate(nodes):
        cmd = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--nproc-per-node",
            str(NPROC),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{nodes[0][2]}:{port}",
            "--rdzv-id",
            f"multinode-{port}",
            "--local-addr",
            addr,
            "--rdzv-conf",
            f"is_host={int(rank == 0)}",
            "-m",
            "benchmarks.multinode",
            "measure",
            str(result),
            str(warmup),
            *overrides(name, steps, run_dir),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env | {"GLOO_SOCKET_IFNAME": dev},
                cwd=REPO,
                start_new_session=True,
            )
        )
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{name}: a node exited {p.returncode}:\n{log[-6000:]}")
    return json.loads(result.read_text())


def summarize(raw: dict) -> dict:
    """Rank 0's tokens/s; per rank and step, the bytes counted intra- and inter-node (median over the measured
    steps without a LISA switch, and mean over all measured steps), and the bytes the links carried."""
    ranks, warmup = raw["ranks"], raw["warmup"]
    timed = raw["ranks"][0]["steps"][warmup:]
    out = {
        "tokens_per_s_median": statistics.median(s["tokens"] / s["s"] for s in timed),
        "tokens_per_s_overall": sum(s["tokens"] for s in timed) / sum(s["s"] for s in timed),
        "step_s_median": statistics.median(s["s"] for s in timed),
        "measured_steps": len(timed),
        "tokens_per_step": timed[-1]["tokens"],
    }
    for side in ("intra", "inter"):
        for kind in ("bytes", "ring_bytes"):
            steady = [statistics.median(s[side][kind] for s in r["steps"][warmup:] if not s["switched"]) for r in ranks]
            mean = [statistics.mean(s[side][kind] for s in r["steps"][warmup:]) for r in ranks]
            out[f"{side}_{kind}"] = statistics.mean(steady)
            out[f"{side}_{kind}_mean"] = statistics.mean(mean)
    wires = [r["wire"] for r in ranks if r["wire"]]
    per_rank_step = len(timed) * raw["world"]
    out["inter_wire_bytes"] = sum(w["veth"] for w in wires) / per_rank_step
    out["intra_wire_bytes"] = sum(w["lo"] for w in wires) / per_rank_step
    steady = next(s for s in ranks[0]["steps"][warmup:] if not s["switched"])
    out["rank0_groups"] = steady["groups"]
    return out


def mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def write_report(out: Path, name: str, results: dict, meta: dict) -> None:
    lines = [
        f"# FSDP vs HSDP on two nodes x {NPROC} ranks, LISA vs full fine-tuning ({meta['params'] / 1e6:.1f}M params)",
        "",
        f"torch {meta['torch']}; {meta['machine']}; link: {meta['link']}. FSDP shards over all 4 ranks; HSDP "
        f"(backend.replicate=2) shards within a node and all-reduces the shards across nodes. {meta['steps']} steps, "
        f"micro batch 4 per rank, LISA gamma 2 of 8 layers, K = {INTERVAL}; medians over the steps after "
        f"{meta['warmup']} warm-up steps. tokens/s: the global batch's non-pad tokens per second of rank 0's step "
        "time, LISA switches included.",
        "",
        "| config | tokens/s (median) | tokens/s (all measured steps) | step s (median) |",
        "| --- | --- | --- | --- |",
        *(
            f"| {n} | {r['tokens_per_s_median']:.0f} | {r['tokens_per_s_overall']:.0f} | {r['step_s_median']:.3f} |"
            for n, r in results.items()
        ),
        "",
        "MB per step per rank. Counted: message bytes of the collectives benchmarks.lib.comm saw (all-gathers "
        "count their output), and the bytes a ring would send for them, split by whether the process group stays "
        "within a node; median over steps without a LISA switch. Wire: bytes the veth (inter-node) and loopback "
        "(intra-node) devices sent, per rank and measured step, switches included, next to the counted ring bytes "
        "averaged the same way.",
        "",
        "| config | intra msg | inter msg | intra ring | inter ring | inter ring (mean) | inter wire | "
        "intra ring (mean) | intra wire |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {n} | {mb(r['intra_bytes'])} | {mb(r['inter_bytes'])} | {mb(r['intra_ring_bytes'])} | "
            f"{mb(r['inter_ring_bytes'])} | {mb(r['inter_ring_bytes_mean'])} | {mb(r['inter_wire_bytes'])} | "
            f"{mb(r['intra_ring_bytes_mean'])} | {mb(r['intra_wire_bytes'])} |"
            for n, r in results.items()
        ),
        "",
        "Rank 0's message MB per step by process group (global ranks; a step without a switch):",
        "",
        "| config | group | all_gather | reduce_scatter | all_reduce |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {n} | {g} | {mb(b.get('all_gather', 0))} | {mb(b.get('reduce_scatter', 0))} | "
            f"{mb(b.get('all_reduce', 0))} |"
            for n, r in results.items()
            for g, b in r["rank0_groups"].items()
        ),
        "",
        "Reading the bytes: a group with ranks on both nodes counts as inter-node, although a ring over ranks "
        "0-1-2-3 crosses the veth on 2 of its 4 hops, so FSDP's veth carries about half of its traffic. The ring "
        "model is not gloo's: gloo runs a reduce-scatter as an all-reduce (its profiler events name it "
        "gloo:all_reduce), so its wire bytes are about 2 (W-1)/W of the message, not (W-1)/W. Wire bytes also "
        "include TCP/IP headers and, on a shaped link, retransmissions. A LISA switch in the FSDP backend "
        "unshards every FSDP unit once (to re-run FSDP's lazy init), a whole-model all-gather: the mean columns "
        "include it.",
    ]
    harness.write_results(out, name, lines, {"meta": meta, "results": results})


def machine(link: str) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Linux {platform.release()}, gloo, 1 thread per rank"


def drive(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        print("skipped: network namespaces need root")
        return
    try:
        with two_namespaces(args.rate) as (nodes, link):
            raw = {}
            for name in CONFIGS:
                start = time.perf_counter()
                raw[name] = launch(nodes, name, args.steps, args.warmup, args.timeout)
                print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    except NoNamespaces as exc:
        print(f"skipped: cannot create network namespaces here (needs root and iproute2): {str(exc).strip()}")
        return
    first = next(iter(raw.values()))
    meta = {
        "command": harness.command(),
        "torch": first["torch"],
        "machine": machine(link),
        "link": link,
        "steps": args.steps,
        "warmup": args.warmup,
        "world": first["world"],
        "ranks_per_node": first["ranks_per_node"],
        "params": first["params"],
    }
    write_report(args.out, args.name, {name: summarize(r) for name, r in raw.items()}, meta)


def main() -> None:
    if sys.argv[1:2] == ["measure"]:
        measure(Path(sys.argv[2]), sys.argv[4:], int(sys.argv[3]))
        return
    parser = harness.parser(__doc__, "multinode")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    parser.add_argument("--rate", default="1gbit", help="tbf rate of the inter-node link; '' leaves it unshaped")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per config")
    drive(parser.parse_args())


if __name__ == "__main__":
    main()
