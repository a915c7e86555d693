"""One Prefect API and one Ray session for a pipeline run (measured pitfalls: ../shared/PLATFORM.md).

`pipeline_runtime()` is the only way flows start services:

- telemetry off; `PREFECT_HOME` under `<home>/state/prefect`; `RAY_TMPDIR` short (unix socket
  paths are limited to 107 bytes) and private to the home;
- ONE Prefect API server in the driver (unless `PREFECT_API_URL` is set), handed to every Ray
  worker, so workers neither start their own ephemeral servers nor fight over one SQLite file;
- a local Ray bound to 127.0.0.1, or the cluster at `ray_address` / `RAY_ADDRESS`, or the Ray this
  process already initialised; infeasible resource requests (a GPU on a GPU-less cluster) fail in
  about a second instead of hanging.

It is re-entrant: nested calls (a flow inside a test session that already holds a runtime) reuse
the outer one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engramflow import home

if TYPE_CHECKING:
    from prefect_ray import RayTaskRunner

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 512 * 2**20
# Read by Ray's GCS/raylet at start: with both, a task no node can ever run fails with
# TaskUnschedulableError instead of waiting forever.
RAY_SCHEDULING_ENV = {
    "RAY_enable_autoscaler_v2": "1",
    "RAY_enable_infeasible_task_early_exit": "true",
    # The v2 autoscaler reports every merely queued request ("No available node types can fulfill
    # {'CPU': 2}") while a task waits for cores another task holds: noise, not failure.
    "RAY_SCHEDULER_EVENTS": "0",
}
# Ray only binds loopback when it believes clusters are disabled; read by `ray._private.services`.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Passed to Ray workers as they are (besides PREFECT_API_URL / PREFECT_HOME).
WORKER_ENV_KEYS = (
    *home.QUIET_ENV,
    "ENGRAMFLOW_HOME",
    "ENGRAMFLOW_STORE",
    "ENGRAMFLOW_MODEL_CACHE",
)
# Ray puts unix sockets under its temp dir, and AF_UNIX paths end at 107 bytes. The longest suffix it
# adds is "/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store", 64 bytes with a 7-digit pid
# (48 here left 107 to 108-byte paths whenever pytest's tmp counter and the pid both grew a digit).
AF_UNIX_PATH_MAX = 107
RAY_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
MAX_RAY_TMPDIR = AF_UNIX_PATH_MAX - RAY_SOCKET_SUFFIX


@dataclass
class Runtime:
    """What a pipeline run talks to."""

    api_url: str
    ray_address: str  # the GCS address (host:port)
    local_ray: bool  # True when this runtime started Ray itself
    started_server: bool
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prefect_server, ray_init


_ACTIVE: Runtime | None = None


def ray_tmpdir() -> Path:
    """Ray's temp dir for this home: `<home>/state/ray` if short enough, else `/tmp/ef-ray-<hash>`."""
    preferred = home.state_dir("ray")
    if len(str(preferred)) <= MAX_RAY_TMPDIR:
        return preferred
    digest = hashlib.sha1(str(preferred).encode()).hexdigest()[:10]
    path = Path(tempfile.gettempdir()) / f"ef-ray-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _worker_env(api_url: str) -> dict[str, str]:
    env = {key: os.environ[key] for key in WORKER_ENV_KEYS if key in os.environ}
    env["PREFECT_API_URL"] = api_url
    env["PREFECT_HOME"] = os.environ["PREFECT_HOME"]
    return env


def _start_prefect_server(stack: ExitStack) -> str:
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    # Prefect read its settings at import, possibly before quiet_env() raised the 20 s default.
    server.start(timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    stack.callback(server.stop)
    return server.api_url


def _connect_ray(address: str | None, num_cpus: int | None, num_gpus: int | None, env: dict[str, str]) -> bool:
    """Initialise Ray unless it already is; True when a local Ray was started here."""
    import ray

    if ray.is_initialized():
        job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars", {})
        if job_env.get("PREFECT_API_URL") != env["PREFECT_API_URL"]:
            log.warning(
                "Ray was initialised outside engramflow.runtime: its workers do not get "
                "PREFECT_API_URL=%s from the job environment (Prefect's serialized settings still "
                "carry it to tasks).",
                env["PREFECT_API_URL"],
            )
        return False
    for key, value in RAY_SCHEDULING_ENV.items():
        os.environ.setdefault(key, value)
    from ray._private import ray_constants

    # The driver filters autoscaler events by a constant read when ray was imported, usually before
    # this runs (prefect_ray imports ray), so the variable alone left the noise in `engramflow demo`.
    ray_constants.AUTOSCALER_EVENTS = int(os.environ["RAY_SCHEDULER_EVENTS"])
    if address:
        if _is_loopback(address):
            # A cluster on this machine's loopback (several raylets on 127.0.0.1): with clusters on,
            # Ray would turn 127.0.0.1 into the machine's network address and never reach it.
            with _loopback_only():
                ray.init(address=address, runtime_env={"env_vars": env})
        else:
            ray.init(address=address, runtime_env={"env_vars": env})
        remote = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"] and not _is_loopback(n["NodeManagerAddress"])]
        if "127.0.0.1" in env["PREFECT_API_URL"] and remote:
            log.warning(
                "Prefect API %s is on this machine's loopback: tasks on other Ray nodes (%s) cannot reach "
                "it. Set PREFECT_API_URL to a server the cluster can reach.",
                env["PREFECT_API_URL"], ", ".join(sorted(set(remote))),
            )
        return False
    # Local workers import task functions by module name exactly as the driver does (pytest's
    # test modules included): give them the driver's import path.
    local_path = [p for p in sys.path if p and os.path.isdir(p)]
    env = {**env, "PYTHONPATH": os.pathsep.join(local_path)}
    with _loopback_only():
        ray.init(
            address="local",  # never attach to a (possibly stale) cluster recorded in RAY_TMPDIR
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            _node_ip_address="127.0.0.1",
            _temp_dir=str(ray_tmpdir()),
            runtime_env={"env_vars": env},
        )
    return True


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's services (and the processes they spawn) bind 127.0.0.1, and a loopback address stays one,
    only while clusters are off; the driver read the flag at import, its children read it from the
    environment."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(RAY_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(RAY_LOOPBACK_ENV)
        else:
            os.environ[RAY_LOOPBACK_ENV] = saved_env


@contextmanager
def pipeline_runtime(
    ray_address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None
) -> Iterator[Runtime]:
    """Quiet environment, one Prefect API, one Ray session; all stopped on exit if started here."""
    global _ACTIVE
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    import ray
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home.quiet_env()
    os.environ.setdefault("PREFECT_HOME", str(home.state_dir("prefect")))
    os.environ.setdefault("RAY_TMPDIR", str(ray_tmpdir()))
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    timings: dict[str, float] = {}
    with ExitStack() as stack:
        api_url = os.environ.get("PREFECT_API_URL")
        started_server = not api_url
        if not api_url:
            start = time.perf_counter()
            api_url = _start_prefect_server(stack)
            timings["prefect_server"] = time.perf_counter() - start
            stack.callback(APILogWorker.drain_all, timeout=5)  # ship buffered run logs before the server stops
        stack.enter_context(
            temporary_settings({PREFECT_API_URL: api_url, PREFECT_HOME: os.environ["PREFECT_HOME"]})
        )
        reused_ray = ray.is_initialized()
        start = time.perf_counter()
        local_ray = _connect_ray(address, num_cpus, num_gpus, _worker_env(api_url))
        timings["ray_init"] = time.perf_counter() - start
        if not reused_ray:
            stack.callback(ray.shutdown)
        gcs = ray.get_runtime_context().gcs_address
        _ACTIVE = Runtime(api_url, gcs, local_ray, started_server, timings)
        try:
            yield _ACTIVE
        finally:
            _ACTIVE = None


def active_runtime() -> Runtime:
    """The runtime entered by the enclosing `pipeline_runtime()`."""
    if _ACTIVE is None:
        raise RuntimeError("no pipeline runtime: wrap the flow call in `with pipeline_runtime():`")
    return _ACTIVE


def task_runner() -> RayTaskRunner:
    """A RayTaskRunner on the current runtime's Ray (it reuses that session and never stops it)."""
    from prefect_ray import RayTaskRunner

    return RayTaskRunner(address=active_runtime().ray_address)


def gpu_options(device: str | torch.device, num_gpus: float = 1.0) -> dict[str, float]:
    """Ray resource options for a stage whose model lives on `device`: use with
    `prefect_ray.context.remote_options(**gpu_options(device))`. Empty on CPU."""
    return {"num_gpus": num_gpus} if torch.device(device).type == "cuda" else {}


def use_assigned_cpus() -> None:
    """Give torch as many threads as Ray assigned CPUs to the running task. Ray worker processes
    are reused across tasks and torch fixes its thread count at import, so a task that asked for
    several CPUs would otherwise compute on one."""
    import ray

    if ray.is_initialized():
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))


def cpu_options(device: str | torch.device, num_cpus: int) -> dict[str, float]:
    """Ray resource options for a CPU-bound stage: `num_cpus` when the model is on the CPU (use with
    `remote_options`), GPU options when it is on CUDA."""
    return gpu_options(device) or {"num_cpus": num_cpus}
