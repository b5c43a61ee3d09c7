"""Multi-process start-up: one process per host (TPU VM worker, GPU node or GPU), joined by `jax.distributed`.

Where the process group comes from, first match wins:
1. explicit arguments (`--coordinator_address HOST:PORT --num_processes N --process_id I`),
2. the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
3. JAX's own cluster detection (Cloud TPU VM, GKE TPU, SLURM, Open MPI, Kubernetes),
4. none of these: a single process, and `jax.distributed` is not started.
This must run before anything touches a JAX backend (device lists, arrays, jit).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import socket
import time
from typing import Any

logger = logging.getLogger("leo_jax.train")

ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"

# How long `allgather_json` waits for the slowest process (a step with evaluation or a checkpoint write on a loaded
# host can take many minutes).
AGREEMENT_TIMEOUT_S = 3600
_rounds: collections.Counter[str] = collections.Counter()


class DistributedStartError(RuntimeError):
    """The process group could not be formed; the message names the setting to fix."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """How this process joins: `explicit` (address, count, id given), `cluster` (JAX detects it) or `single`."""

    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cluster: str | None = None


def _int_setting(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedStartError(f"{name}={value!r} is not an integer") from None


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX would auto-detect (opt-in methods such as mpi4py excluded), or None."""
    try:
        from jax._src import clusters  # JAX's detection table; private, so a change there degrades to None
        kinds = clusters.ClusterEnv._cluster_types
    except (ImportError, AttributeError):
        return None
    for kind in kinds:
        if getattr(kind, "opt_in_only_method", False):
            continue
        try:
            if kind.is_env_present():
                return kind.__name__
        except Exception as e:  # a detector that cannot probe (no metadata server, ...) means "not this one"
            logger.debug("cluster detector %s failed: %s", kind.__name__, e)
    return None


def resolve_process_group(coordinator_address: str | None = None, num_processes: int | None = None,
                          process_id: int | None = None, environ=None) -> ProcessGroup:
    """Decides how to start from the arguments, then the environment, then cluster detection (see module doc)."""
    environ = os.environ if environ is None else environ
    address = coordinator_address or environ.get(ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _int_setting(environ.get(ENV_NUM_PROCESSES),
                                                                          ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else _int_setting(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    given = {"--coordinator_address / " + ENV_ADDRESS: address, "--num_processes / " + ENV_NUM_PROCESSES: count,
             "--process_id / " + ENV_PROCESS_ID: index}
    if any(v is not None for v in given.values()):
        missing = [name for name, v in given.items() if v is None]
        if missing:
            raise DistributedStartError(f"a multi-process start needs all three settings; missing: {missing}")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedStartError(f"coordinator address {address!r} must look like HOST:PORT")
        if count < 1:
            raise DistributedStartError(f"num_processes={count} must be at least 1")
        if not 0 <= index < count:
            raise DistributedStartError(f"process_id={index} is out of range for num_processes={count} "
                                        f"(valid: 0..{count - 1})")
        return ProcessGroup("explicit", address, count, index)
    cluster = detected_cluster()
    return ProcessGroup("cluster", cluster=cluster) if cluster else ProcessGroup("single")


def initialize(group: ProcessGroup, timeout_s: int = 300) -> None:
    """Starts `jax.distributed` for `group` (nothing for a single process). An unreachable coordinator is an error
    after `timeout_s` seconds, naming the address, not a hang."""
    import jax

    if group.mode == "single":
        return
    if group.mode == "cluster":
        logger.info("starting jax.distributed from the detected cluster environment (%s)", group.cluster)
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return
    if group.num_processes == 1:  # a one-process "group": nothing to join
        return
    logger.info("starting jax.distributed: process %d of %d, coordinator %s", group.process_id, group.num_processes,
                group.coordinator_address)
    # JAX's client aborts the whole process (no Python exception) when the coordinator never answers, so reachability
    # is checked here first, where it can still be a clear error.
    if group.process_id == 0:
        _check_port_free(group.coordinator_address)
    else:
        _wait_for_coordinator(group.coordinator_address, timeout_s)
    try:
        jax.distributed.initialize(group.coordinator_address, num_processes=group.num_processes,
                                   process_id=group.process_id, initialization_timeout=timeout_s)
    except Exception as e:  # the client raises XlaRuntimeError / RuntimeError with a long gRPC status
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedStartError(
            f"could not join the process group at {group.coordinator_address} within {timeout_s} s as process "
            f"{group.process_id} of {group.num_processes}: {first_line}. Check that process 0 runs on that host and "
            "port, that the port is reachable from this host, and that every process got the same address and "
            "count") from e


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _check_port_free(address: str) -> None:
    """Process 0 hosts the coordinator: its port must be free on this host."""
    host, port = _split_address(address)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise DistributedStartError(f"process 0 cannot host the coordinator on port {port} ({address}): {e}. "
                                        "Choose a free port for --coordinator_address / JAX_COORDINATOR_ADDRESS") from e


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls the coordinator's port until it accepts a connection; an error naming the address after `timeout_s`."""
    host, port = _split_address(address)
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            last = e
            time.sleep(0.5)
    raise DistributedStartError(f"the coordinator at {address} did not answer within {timeout_s} s ({last}). Start "
                                "process 0 first (it hosts the coordinator), check the host name/port and that the "
                                "port is reachable from this host, or raise --distributed_timeout")


def describe() -> str:
    """One start-up line: this process, the process count, local and global devices."""
    import jax

    devices = jax.devices()
    return (f"host {socket.gethostname()}: process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} local / {len(devices)} global {devices[0].platform} devices "
            f"({devices[0].device_kind})")


def allgather_json(name: str, value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order; every process must call it with the same
    `name` the same number of times. It goes through the coordination service's key-value store, host to host,
    so it never waits for steps still queued on the devices (a device collective would)."""
    import jax

    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    round_ = _rounds[name]
    _rounds[name] += 1
    me, count = jax.process_index(), jax.process_count()
    client.key_value_set(f"leo_jax/{name}/{round_}/{me}", json.dumps(value))
    try:
        values = [json.loads(client.blocking_key_value_get(f"leo_jax/{name}/{round_}/{i}",
                                                           AGREEMENT_TIMEOUT_S * 1000)) for i in range(count)]
    except Exception as e:
        raise RuntimeError(f"process {me}: no answer from every process for {name!r} round {round_} within "
                           f"{AGREEMENT_TIMEOUT_S} s ({str(e).strip().splitlines()[0][:200]}); another process "
                           "has probably failed: see its log") from e
    if round_ >= 2:  # every process has read round - 2 before writing round - 1
        client.key_value_delete(f"leo_jax/{name}/{round_ - 2}/{me}")
    return values
