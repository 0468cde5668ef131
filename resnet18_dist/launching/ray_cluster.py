"""The Ray cluster a launcher runs on: join one or start a private one, read what it holds,
refuse (naming the option) a request it cannot place. Shared by training, sweeps and serving;
imports neither torch nor the training stack, so a launcher starts Ray while those load."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from resnet18_dist.checkout import pythonpath_with_checkout
from resnet18_dist.config import ClusterConfig, DeviceConfig
from resnet18_dist.options import ConfigError


def require_train_v2() -> None:
    """Refuse Ray Train V1 at once: the launcher relies on V2 (the worker's return value, the
    restoration of a run from its storage, the Tune integration)."""
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    if not is_v2_enabled():
        raise ConfigError(
            V2_ENABLED_ENV_VAR,
            f"Ray Train V1 is selected ({V2_ENABLED_ENV_VAR}="
            f"{os.environ.get(V2_ENABLED_ENV_VAR)!r}); this project needs Ray Train V2, the "
            f"default since Ray 2.50: unset {V2_ENABLED_ENV_VAR} or set it to 1",
        )


def start_ray(address: str | None, verbose: bool = False, dashboard: bool = True) -> bool:
    """Join RAY_ADDRESS / --address / a running local cluster, or start a private local Ray.

    Returns True when this process started a private Ray. A private Ray starts no idle
    workers in advance, and Ray Train's controller polls its workers more often and runs no
    preemption watcher (there is no spot instance to lose on one machine): on a small run these
    cut seconds of start-up and teardown. It keeps its dashboard (``dashboard=True``): Train
    V2's placement-group cleaner and worker-group cleanup query the State API through it. A
    cluster started with ``ray start`` keeps its own settings.
    """
    import ray

    if ray.is_initialized():
        return False
    for name, value in PRIVATE_RAY_ENV.items():
        # Read by the raylet this call starts, if it starts one; a running cluster keeps its own.
        os.environ.setdefault(name, value)
    own_api = {}
    if dashboard and _starts_private_ray(address):
        own_api = {"dashboard_host": "127.0.0.1", "dashboard_port": _own_state_api()}
    ray.init(
        address=address,
        include_dashboard=dashboard,  # ignored when joining an existing cluster
        **own_api,
        logging_level=logging.INFO if verbose else logging.WARNING,
        log_to_driver=True,
        # Workers import this package from the driver's checkout even when it is not installed
        # (a fresh clone, or a `ray job submit --working-dir` upload that already sets this).
        runtime_env=None if os.environ.get("RAY_JOB_ID") else local_runtime_env(),
    )
    from ray._private import worker

    private = bool(getattr(worker._global_node, "head", False))
    if private:
        for name, value in PRIVATE_RAY_TRAIN_ENV.items():
            os.environ.setdefault(name, value)  # read by Ray Train's controller
    return private


def _starts_private_ray(address: str | None) -> bool:
    """Whether ``ray.init(address)`` starts a new local Ray (Ray's own rule: RAY_ADDRESS, then
    the cluster that the last `ray start` recorded, else a new one). A Ray Client address
    (``ray://host:10001``) joins a cluster; Ray's address parser does not take it, so it is
    answered here and anything else it cannot parse is left to ``ray.init`` to refuse."""
    from ray._private.services import canonicalize_bootstrap_address

    given = address or os.environ.get("RAY_ADDRESS") or ""
    if "://" in given:
        return False
    try:
        return canonicalize_bootstrap_address(address) is None
    except ValueError:
        return False


def _own_state_api() -> int:
    """Pick the private Ray's dashboard port and point Ray's State API at it, for this process
    and for every Ray process it starts (they inherit the environment).

    Without this, State API calls that name no address (Ray Train V2's placement-group
    cleaner and worker-group cleanup make them) look for "the" Ray on this machine by listing
    GCS processes, and fail with "Found multiple active Ray instances" as soon as a second
    private Ray runs here (a second run on the same machine); beside a `ray start` cluster they
    would ask that cluster instead, miss this run's controller there and remove a live run's
    placement group. Ray has no option for this, so the port is chosen here (probed free; Ray's
    default, 8265 and up, is shared by every Ray on the machine), which also moves a private
    Ray's dashboard off 8265."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return port


# A private Ray starts no idle worker processes in advance: they would be started with another
# runtime environment than the trainer's actors, so never used, and on a small machine their
# start-up competes with the run's own (measured: about 1.3 s less wall time on 2 cores).
PRIVATE_RAY_ENV = {
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
}

# Ray Train V2's own settings (ray/train/v2/_internal/constants.py) for a private local Ray:
# the controller notices a started or finished worker group within 0.2 s instead of 2 s, starts
# no preemption-watcher actor (one Python process fewer to start and stop), and exports no
# Prometheus metrics (nothing scrapes a Ray that lives as long as one run).
PRIVATE_RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def local_runtime_env() -> dict[str, Any]:
    return {"env_vars": {"PYTHONPATH": pythonpath_with_checkout()}}


def cluster_capacity() -> tuple[float, float, float]:
    """(total CPUs, the most CPUs on one node, total GPUs) of the live nodes."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [n["Resources"].get("CPU", 0.0) for n in nodes]
    gpus = sum(n["Resources"].get("GPU", 0.0) for n in nodes)
    return sum(cpus), max(cpus, default=0.0), gpus


def resolve_use_gpu(device: DeviceConfig, gpus: float) -> bool:
    if device.use_gpu == "on":
        return True
    if device.use_gpu == "off":
        return False
    return gpus > 0


def check_resources(
    cluster: ClusterConfig, device: DeviceConfig, *, trial_waits: bool = False
) -> bool:
    """Refuse, naming the option, a request the cluster cannot place; returns use_gpu.

    The live nodes are checked first. Where they cannot hold the workers and the cluster has an
    autoscaler, it is asked for them and waited for, up to --wait-for-resources
    (launching/autoscaler.py); without one, the request is refused at once. ``trial_waits``: a
    sweep, whose plan waits for a whole trial (tuning/sweep.py), so nothing is waited for here.
    ``--use-gpu auto`` with no GPU up trains on GPUs where the autoscaler can add a GPU node.
    """
    from resnet18_dist.launching.autoscaler import (
        autoscaler_kind,
        can_ever_hold,
        wait_for_nodes,
    )

    total, per_node, gpus = cluster_capacity()

    @functools.cache
    def scaler() -> str | None:  # asked (GCS and KV reads) only where the live nodes fall short
        return autoscaler_kind() if cluster.wait_for_resources > 0 else None

    use_gpu = resolve_use_gpu(device, gpus)
    if device.use_gpu == "auto" and not gpus and scaler() == "v2" and can_ever_hold([{"GPU": 1.0}]):
        print("No GPU node is up; the autoscaler can add GPU nodes: training on GPUs", flush=True)
        use_gpu = True
    if device.amp == "fp16" and not use_gpu:  # else each worker refuses it after Ray starts
        raise ConfigError("--amp", "fp16 is for CUDA GPUs; these workers train on CPUs")
    cpus = cluster.cpus_per_worker or 1
    # An elastic run starts once its MIN workers fit; Ray Train grows it later.
    workers = cluster.min_workers
    short = _shortfall(workers, cpus, use_gpu, device, total, per_node, gpus)
    if short is None:
        return use_gpu
    option, message = short
    if scaler() is None:
        raise ConfigError(option, message)
    if not trial_waits:
        bundle = {"CPU": float(cpus), **({"GPU": 1.0} if use_gpu else {})}
        wait_for_nodes(
            [bundle] * workers,
            cluster.placement.upper(),  # Ray Train's own strategy (integrations/ray_train.py)
            cluster.wait_for_resources,
            scaler(),
            option,
            message,
        )
    return use_gpu


def _shortfall(
    workers: int,
    cpus: int,
    use_gpu: bool,
    device: DeviceConfig,
    total: float,
    per_node: float,
    gpus: float,
) -> tuple[str, str] | None:
    """(option, why) where the live nodes cannot hold the workers; None where they can."""
    if cpus > per_node:
        return (
            "--cpus-per-worker",
            f"{cpus} CPUs per worker, but no node of the cluster has more than {per_node:g}",
        )
    need = workers * cpus
    if need > total:
        return (
            "--num-workers",
            f"{workers} workers x {cpus} CPU(s) = {need} CPUs, but the "
            f"cluster has {total:g}; lower --num-workers or --cpus-per-worker",
        )
    if use_gpu and workers > gpus:
        return (
            "--num-workers",
            f"{workers} GPU workers, but the cluster has {gpus:g} GPU(s)"
            + ("" if device.use_gpu == "on" else "; pass --use-gpu off to train on CPUs"),
        )
    return None
