"""The pipeline runtime: one shared Prefect API for Ray workers, loopback Ray, fail-fast GPU requests."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
import ray
from prefect import flow, get_client, task
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter
from prefect.settings import PREFECT_API_URL
from prefect_ray.context import remote_options
from ray.exceptions import TaskUnschedulableError

from engramflow.runtime import (
    AF_UNIX_PATH_MAX,
    RAY_SOCKET_SUFFIX,
    Runtime,
    gpu_options,
    pipeline_runtime,
    ray_tmpdir,
    task_runner,
)

SERVER_APP = "prefect.server.api.server:create_app"


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # '::ffff:127.0.0.1'
    return (mapped or address).is_loopback


def _descendants() -> list:
    """Processes started by this test process, its Ray workers included."""
    import psutil  # Ray ships psutil on its own sys.path entry; importable once `ray` is imported

    return psutil.Process().children(recursive=True)


def _prefect_servers_below_us() -> list[str]:
    """Command lines of Prefect API servers started by this test process or by its Ray workers."""
    import psutil

    servers = []
    for proc in _descendants():
        try:
            if SERVER_APP in " ".join(proc.cmdline()):
                servers.append(" ".join(proc.cmdline()))
        except psutil.NoSuchProcess:
            continue
    return servers


@task
def where_am_i(tag: str) -> dict[str, object]:
    return {"tag": tag, "pid": os.getpid(), "api_url": PREFECT_API_URL.value(), "env_url": os.environ.get("PREFECT_API_URL")}


@task
def combine(a: dict[str, object], b: dict[str, object]) -> list[dict[str, object]]:
    return [a, b]


@flow
def two_task_flow() -> list[dict[str, object]]:
    a = where_am_i.submit("a")
    b = where_am_i.submit("b")
    return combine.submit(a, b).result()


@task
def needs_gpu() -> str:
    return "ran"


@flow
def gpu_flow(num_gpus: float) -> str:
    with remote_options(num_gpus=num_gpus):
        future = needs_gpu.submit()
    return future.result(timeout=300)  # a hang fails the test instead of blocking it


def test_flow_runs_on_ray_through_one_shared_api(ray_runtime: Runtime) -> None:
    state = two_task_flow.with_options(task_runner=task_runner())(return_state=True)
    assert state.is_completed(), state
    a, b = state.result()
    assert {a["tag"], b["tag"]} == {"a", "b"}
    for row in (a, b):
        assert row["pid"] != os.getpid()  # ran in a Ray worker
        assert row["api_url"] == ray_runtime.api_url
        assert row["env_url"] == ray_runtime.api_url
    # the Ray workers (children of our raylet) are still up: the driver's server is the only
    # Prefect server in our process tree, no worker started an ephemeral one
    assert len(_prefect_servers_below_us()) == (1 if ray_runtime.started_server else 0)

    async def recorded() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
                task_run_filter=TaskRunFilter(),
            )
        return sorted(run.state.type.value for run in runs)

    import asyncio

    assert asyncio.run(recorded()) == ["COMPLETED"] * 3


def test_infeasible_gpu_request_fails_fast(ray_runtime: Runtime) -> None:
    too_many = ray.cluster_resources().get("GPU", 0) + 1
    with pytest.raises(TaskUnschedulableError, match="not enough resources"):
        gpu_flow.with_options(task_runner=task_runner())(too_many)


def test_local_ray_listens_on_loopback_only(ray_runtime: Runtime) -> None:
    if not ray_runtime.local_ray:
        pytest.skip("connected to an external Ray cluster")
    assert ray_runtime.ray_address.startswith("127.0.0.1:")
    import psutil

    listening = set()
    for proc in _descendants():
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.add(conn.laddr.ip)
        except psutil.NoSuchProcess:
            continue
    assert listening and all(_is_loopback(ip) for ip in listening), listening


def test_runtime_is_reentrant_and_keeps_paths_short(ray_runtime: Runtime) -> None:
    with pipeline_runtime() as inner:
        assert inner is ray_runtime
    # The longest socket Ray creates must fit AF_UNIX's 107 bytes, whatever the pid.
    assert len(str(ray_tmpdir())) + RAY_SOCKET_SUFFIX <= AF_UNIX_PATH_MAX
    assert Path(os.environ["PREFECT_HOME"]).is_dir()


def test_gpu_options() -> None:
    assert gpu_options("cpu") == {}
    assert gpu_options("cuda:0") == {"num_gpus": 1.0}
    assert gpu_options("cuda", 0.5) == {"num_gpus": 0.5}


def test_the_driver_drops_autoscaler_events(ray_runtime: Runtime) -> None:
    """A task waiting for cores another task holds is queued, not failing: Ray's "No available node
    types can fulfill resource requests" events must not reach the user's console."""
    from ray._private import ray_constants
    from ray._private.worker import filter_autoscaler_events

    assert ray_constants.AUTOSCALER_EVENTS == 0
    event = "No available node types can fulfill resource requests {'CPU': 2.0}*1."
    assert list(filter_autoscaler_events([event])) == []
