"""A Ray cluster of several nodes on this machine's loopback, for tests and benchmarks of what runs on a
cluster: a real `ray start --head` and `ray start --address` per extra node, each its own raylet and
worker pool, all bound to 127.0.0.1, with a private temp dir.

Each node runs `ray start --block` in a process group of its own, so stopping the cluster ends exactly
the processes it started (never `ray stop`, which ends every Ray process of the user on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from engramflow import home
from engramflow.runtime import RAY_SCHEDULING_ENV

# `ray start` as Ray ships it, except that a loopback --node-ip-address stays one: with clusters on
# (Linux), Ray replaces 127.0.0.1 with the machine's network address and binds its services there; with
# clusters off it binds loopback but refuses to start a second node.
RAY_START = (
    "import sys\n"
    "from ray._private import services\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray', *sys.argv[1:]]\n"
    "main()\n"
)
READY = "Ray runtime started"
OBJECT_STORE_BYTES = 256 * 2**20


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    process: subprocess.Popen
    log: Path


@dataclass
class LocalCluster:
    """A running loopback cluster: its GCS address (for `--ray-address`) and its nodes."""

    address: str
    temp_dir: Path
    nodes: list[Node] = field(default_factory=list)

    def stop(self, grace: float = 20.0) -> None:
        """End every node's process group: SIGTERM (Ray drains the node), SIGKILL after `grace` seconds.
        Worker nodes first, the head last."""
        for node in reversed(self.nodes):
            _signal_group(node.process, signal.SIGTERM)
            try:
                node.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(node.process, signal.SIGKILL)
            node.process.wait()
        self.nodes.clear()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _start_node(args: list[str], env: dict[str, str], log: Path, timeout: float) -> Node:
    out = log.open("w")
    process = subprocess.Popen([sys.executable, "-c", RAY_START, "start", *args, "--block"], env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    node = Node(process, log)
    deadline = time.monotonic() + timeout
    while READY not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            _signal_group(process, signal.SIGKILL)
            process.wait()
            raise RuntimeError(f"ray start {' '.join(args)} did not start: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return node


@contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1, env: dict[str, str] | None = None,
                  timeout: float = 180.0) -> Iterator[LocalCluster]:
    """Start a head and `nodes - 1` worker nodes (`cpus_per_node` CPUs each) on 127.0.0.1; stop them on
    exit. `env`: the nodes' environment (their workers inherit it: PYTHONPATH, ENGRAMFLOW_MODEL_CACHE)."""
    # Short: Ray's unix socket paths under it are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="efc-", dir="/tmp"))
    node_env = {**(env if env is not None else os.environ), **home.QUIET_ENV, **RAY_SCHEDULING_ENV,
                "RAY_TMPDIR": str(temp_dir)}
    for key in ("RAY_ADDRESS", "PREFECT_API_URL"):
        node_env.pop(key, None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--num-gpus", "0",
              "--temp-dir", str(temp_dir), "--object-store-memory", str(OBJECT_STORE_BYTES)]
    cluster = LocalCluster(address, temp_dir)
    try:
        cluster.nodes.append(_start_node(
            ["--head", "--port", str(port), "--include-dashboard", "false", "--disable-usage-stats",
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             *common], node_env, temp_dir / "node-0.log", timeout))
        for i in range(1, nodes):
            cluster.nodes.append(_start_node(
                ["--address", address, "--dashboard-agent-listen-port", str(free_port()), *common],
                node_env, temp_dir / f"node-{i}.log", timeout))
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
