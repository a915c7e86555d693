"""One Prefect API and one Ray session for a pipeline run (measured pitfalls: ../shared/PLATFORM.md).

`pipeline_runtime()` is the only way flows start services:

- telemetry off; `PREFECT_HOME` under `<home>/state/prefect` (mode 0700); Ray's temp dir a fresh
  private directory per session (mode 0700, unpredictable name, short: unix socket paths are limited
  to 107 bytes), removed when the session ends (kept, and named, when the run failed);
- ONE Prefect API server in the driver (unless `PREFECT_API_URL` is set), handed to every Ray
  worker, so workers neither start their own ephemeral servers nor fight over one SQLite file; it
  requires a random auth string (`PREFECT_SERVER_API_AUTH_STRING`) that only the driver and its
  workers know;
- a local Ray bound to 127.0.0.1 with token authentication (a random token in a 0600 file; unless
  `RAY_AUTH_MODE` says otherwise), or the cluster at `ray_address` / `RAY_ADDRESS` (its own auth:
  docs/architecture.md), or the Ray this process already initialised; infeasible resource requests
  (a GPU on a GPU-less cluster) fail in about a second instead of hanging;
- tasks declared safe to rerun (`retry_on_worker_loss`) are retried by Ray when their worker
  process dies; no task is retried on an exception it raised.

It is re-entrant: nested calls (a flow inside a test session that already holds a runtime) reuse
the outer one.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from engramflow import home

if TYPE_CHECKING:
    from prefect_ray import RayTaskRunner

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    *home.PLAIN_OUTPUT_ENV,
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
    ray_tmpdir: Path | None = None  # the private temp dir of a local Ray started here


_ACTIVE: Runtime | None = None


RAY_TMP_PREFIX = "ef-ray-"
OWNER_FILE = "owner.pid"  # the pid of the driver that created a Ray temp dir
# Ray makes its temp dir world-writable (0777); it lives in a private parent (0700) nobody else can enter.
RAY_SUBDIR = "r"
# Task name -> how often Ray runs it again when the worker process running it dies (`retry_on_worker_loss`).
WORKER_RETRIES: dict[str, int] = {}


def _ray_tmp_base() -> Path:
    """Where Ray temp dirs are made: `<home>/state/ray` when short enough, else the system temp dir."""
    preferred = home.state_dir("ray")
    if len(str(preferred)) + len(f"/{RAY_TMP_PREFIX}xxxxxxxx/{RAY_SUBDIR}") <= MAX_RAY_TMPDIR:
        return preferred
    return Path(tempfile.gettempdir())


def ray_tmpdir() -> Path:
    """The temp dir of the active runtime's local Ray, else where the next one will be made."""
    if _ACTIVE is not None and _ACTIVE.ray_tmpdir is not None:
        return _ACTIVE.ray_tmpdir
    return _ray_tmp_base()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_ray_dirs(base: Path) -> None:
    """Remove the Ray temp dirs (ours only) whose driver is gone: a run killed before it could clean up."""
    for path in base.glob(f"{RAY_TMP_PREFIX}*"):
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            pid = int((path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def new_ray_tmpdir() -> Path:
    """A fresh directory for one local Ray session, inside a private parent (mode 0700, a name nobody can
    predict, so no other user can create it first or enter it); short enough for Ray's unix sockets.
    Ray's own `_temp_dir` is `<parent>/r`: Ray makes that one world-writable."""
    base = _ray_tmp_base()
    _remove_stale_ray_dirs(base)
    parent = Path(tempfile.mkdtemp(prefix=RAY_TMP_PREFIX, dir=base))
    (parent / OWNER_FILE).write_text(str(os.getpid()))
    (parent / RAY_SUBDIR).mkdir(mode=0o700)
    return parent / RAY_SUBDIR


def _private_file(path: Path, content: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    return path


def _ray_token_auth(private: Path, stack: ExitStack) -> None:
    """Token authentication for a local Ray started here: a random token in a 0600 file, so no other local
    user can submit work to it. `RAY_AUTH_MODE=disabled` (or a token of the user's own) is respected."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        log.warning("RAY_AUTH_MODE=%s: the local Ray accepts work from any local user", mode)
        return
    if mode is not None and ("RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ):
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_private_file(private / "auth_token", secrets.token_hex(32)))

    def reload() -> None:  # the driver caches the mode and the token: make it read them again
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    def restore() -> None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reload()

    reload()
    stack.callback(restore)


def _worker_env(api_url: str) -> dict[str, str]:
    env = {key: os.environ[key] for key in WORKER_ENV_KEYS if key in os.environ}
    env["PREFECT_API_URL"] = api_url
    env["PREFECT_HOME"] = os.environ["PREFECT_HOME"]
    from prefect.settings import PREFECT_API_AUTH_STRING

    auth = PREFECT_API_AUTH_STRING.value()
    if auth:
        env["PREFECT_API_AUTH_STRING"] = auth.get_secret_value() if hasattr(auth, "get_secret_value") else str(auth)
    return env


class _DropServerNotices(logging.Filter):
    """Prefect announces the temporary server it starts with a link to its docs; ours lives and dies with
    the command, so the notice (and the run links a UI would serve) is noise in a user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Starting temporary server", "Stopping temporary server"))


def _start_prefect_server(stack: ExitStack) -> str:
    """Start the Prefect API server for this runtime, requiring a random auth string that only this
    process and its workers are given."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_SERVER_API_AUTH_STRING, temporary_settings

    auth = os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or secrets.token_urlsafe(32)
    stack.enter_context(temporary_settings({PREFECT_SERVER_API_AUTH_STRING: auth, PREFECT_API_AUTH_STRING: auth}))
    server = SubprocessASGIServer()
    notices = _DropServerNotices()
    prefect_log = logging.getLogger("prefect")
    prefect_log.addFilter(notices)
    stack.callback(prefect_log.removeFilter, notices)
    # Prefect read its settings at import, possibly before quiet_env() raised the 20 s default.
    server.start(timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    stack.callback(server.stop)
    log.debug("Prefect API for this command at %s", server.api_url)
    return server.api_url


def _connect_ray(address: str | None, num_cpus: int | None, num_gpus: int | None, env: dict[str, str],
                 tmp: Path | None = None) -> bool:
    """Initialise Ray unless it already is (a local one in `tmp`); True when a local Ray was started here."""
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
            _temp_dir=str(tmp),
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
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    timings: dict[str, float] = {}
    tmp = None
    with ExitStack() as stack:
        api_url = os.environ.get("PREFECT_API_URL")
        started_server = not api_url
        if not api_url:
            start = time.perf_counter()
            api_url = _start_prefect_server(stack)
            timings["prefect_server"] = time.perf_counter() - start
            stack.callback(APILogWorker.drain_all, timeout=5)  # ship buffered run logs before the server stops
        settings = {PREFECT_API_URL: api_url, PREFECT_HOME: os.environ["PREFECT_HOME"]}
        if started_server:  # no UI outlives the command: no "View at <url>" links to a server that is gone
            from prefect.settings import PREFECT_UI_URL

            settings[PREFECT_UI_URL] = ""
        stack.enter_context(temporary_settings(settings))
        reused_ray = ray.is_initialized()
        if not reused_ray and not address:
            if "RAY_TMPDIR" in os.environ:  # the user's choice; the token still goes to a private dir of ours
                tmp = Path(os.environ["RAY_TMPDIR"])
                private = Path(tempfile.mkdtemp(prefix="auth-", dir=home.state_dir("ray")))
                stack.callback(shutil.rmtree, private, True)
            else:
                tmp = new_ray_tmpdir()
                private = tmp.parent
            _ray_token_auth(private, stack)
        outcome = {"failed": True}
        if tmp is not None and "RAY_TMPDIR" not in os.environ:  # runs after ray.shutdown (callbacks: last first)
            stack.callback(lambda: _clean_ray_tmpdir(tmp, outcome["failed"]))
        start = time.perf_counter()
        local_ray = _connect_ray(address, num_cpus, num_gpus, _worker_env(api_url), tmp)
        timings["ray_init"] = time.perf_counter() - start
        if not reused_ray:
            stack.callback(ray.shutdown)
        gcs = ray.get_runtime_context().gcs_address
        _ACTIVE = Runtime(api_url, gcs, local_ray, started_server, timings, tmp if local_ray else None)
        try:
            yield _ACTIVE
            outcome["failed"] = False
        finally:
            _ACTIVE = None


def _clean_ray_tmpdir(path: Path, failed: bool) -> None:
    """Remove a finished session's Ray temp dir (sessions, logs, sockets); keep it when the run failed."""
    if failed:
        log.warning("Ray session files (logs of the failed run) kept in %s", path)
        return
    shutil.rmtree(path.parent, ignore_errors=True)


def active_runtime() -> Runtime:
    """The runtime entered by the enclosing `pipeline_runtime()`."""
    if _ACTIVE is None:
        raise RuntimeError("no pipeline runtime: wrap the flow call in `with pipeline_runtime():`")
    return _ACTIVE


def retry_on_worker_loss(task: T, retries: int = 2) -> T:
    """Declare `task` safe to run again from its start when the worker process running it dies (it checks
    the ledger before it writes, so nothing is applied twice): Ray then reruns it up to `retries` times.
    An exception the task raised is never retried (it would fail the same way). Undeclared tasks are not
    rerun at all. Prefect's own retries cannot help here: its task engine dies with the worker."""
    WORKER_RETRIES[task.name] = retries
    return task


def task_runner() -> RayTaskRunner:
    """A RayTaskRunner on the current runtime's Ray (it reuses that session and never stops it) that
    gives each task the worker-loss retries it declared (`retry_on_worker_loss`; none otherwise)."""
    return _runner_class()(address=active_runtime().ray_address)


@functools.cache
def _runner_class() -> type[RayTaskRunner]:
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    class RetryingRayTaskRunner(RayTaskRunner):
        def submit(self, task, parameters, wait_for=None, dependencies=None):  # type: ignore[override]
            with remote_options(max_retries=WORKER_RETRIES.get(task.name, 0), retry_exceptions=False):
                return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    return RetryingRayTaskRunner


def gpu_options(device: str | torch.device, num_gpus: float = 1.0) -> dict[str, float]:
    """Ray resource options for a stage whose model lives on `device`: use with
    `prefect_ray.context.remote_options(**gpu_options(device))`. Empty on CPU."""
    return {"num_gpus": num_gpus} if torch.device(device).type == "cuda" else {}


def use_assigned_cpus() -> None:
    """Give torch as many threads as Ray assigned CPUs to the running task. Ray worker processes
    are reused across tasks and torch fixes its thread count at import, so a task that asked for
    several CPUs would otherwise compute on one."""
    import ray

    if not ray.is_initialized():
        return
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except AssertionError:  # Ray asserts worker mode: a task function called in the driver keeps its threads
        return
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def cpu_options(device: str | torch.device, num_cpus: int) -> dict[str, float]:
    """Ray resource options for a CPU-bound stage: `num_cpus` when the model is on the CPU (use with
    `remote_options`), GPU options when it is on CUDA."""
    return gpu_options(device) or {"num_cpus": num_cpus}
