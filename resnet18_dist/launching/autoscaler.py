"""An autoscaling cluster's part in placing a run: whether the cluster has an autoscaler that
can add nodes, and waiting (up to --wait-for-resources) while it adds those a run needs.

Ray's autoscaler adds nodes for demand it sees: pending tasks, actors and placement groups. So
a launcher asks for what its workers need as a placement group of the same bundles and
strategy as Ray Train's, waits until it is placed, and removes it: the nodes stay up (idle for
the autoscaler's idle timeout, minutes) while Ray Train places its own group on them. A
placement group is removed with the job that made it, so a killed launcher leaves no standing
request behind (``ray.autoscaler.sdk.request_resources`` would hold the nodes until someone
overrides it). Autoscaler v2 reports a request that no node type can ever hold as infeasible,
which is refused at once; autoscaler v1 reports that only in its log, so there the wait runs
out instead.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Literal

from resnet18_dist.options import ConfigError

Autoscaler = Literal["v1", "v2"]
Bundle = dict[str, float]

PROGRESS_EVERY_S = 30.0  # a line while waiting, so a long wait never looks like a hang


def autoscaler_kind() -> Autoscaler | None:
    """Which autoscaler the connected cluster runs, or None where none can add nodes.

    v2 reports its state to the GCS (a nonzero state version). v1's monitor writes a status
    to the GCS's key-value store; on a cluster of fixed nodes (``ray start`` without an
    autoscaling config, a private local Ray) it runs with a read-only provider whose node types
    are the live nodes themselves, named ``node_<node id>``: that is no autoscaler.
    """
    reply = _cluster_status()
    if reply is not None and reply.autoscaling_state.autoscaler_state_version > 0:
        return "v2"
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception:  # (a Ray Client connection has no KV access: no answer)
        return None
    if not raw:
        return None
    report = json.loads(raw).get("autoscaler_report") or {}
    types = (report.get("node_type_mapping") or {}).items()
    if any(node_type != f"node_{node}" for node, node_type in types):
        return "v1"
    return None


def _cluster_status():
    """The autoscaler's view from the GCS (GetClusterStatusReply), None where unavailable."""
    try:
        from ray._private import worker
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(worker.global_worker.gcs_client.get_cluster_status(timeout_s=10))
        return reply
    except Exception:  # (Ray Client, an older GCS: no autoscaler view)
        return None


def describe(bundles: list[Bundle]) -> str:
    """``2 x {CPU: 1, GPU: 1}`` (+ ...): the request as a user reads it."""
    counts = Counter(tuple(sorted(b.items())) for b in bundles)
    parts = []
    for shape, n in counts.items():
        inner = ", ".join(f"{k}: {v:g}" for k, v in shape)
        parts.append(f"{n} x {{{inner}}}")
    return " + ".join(parts)


def live_capacity() -> str:
    """What the live nodes hold, in a line: ``3 node(s), 4 CPU(s), 0 GPU(s)``."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n["Resources"].get("CPU", 0.0) for n in nodes)
    gpus = sum(n["Resources"].get("GPU", 0.0) for n in nodes)
    return f"{len(nodes)} live node(s) with {cpus:g} CPU(s) and {gpus:g} GPU(s)"


def _infeasible(pg_id: str, bundles: list[Bundle], reply=None) -> bool:
    """Whether no node type can ever hold this placement group: autoscaler v2 reports it
    infeasible, and the live nodes could not hold it even idle. v2 judges against what is free
    now plus what it may still add, so on a busy cluster at its largest a request that fits
    its totals is called infeasible too; that one waits for the other work instead."""
    reply = reply or _cluster_status()
    if reply is None:
        return False
    reported = any(
        req.details.startswith(pg_id)
        for req in reply.autoscaling_state.infeasible_gang_resource_requests
    )
    return reported and not _fits_live_totals(bundles)


def _fits_live_totals(bundles: list[Bundle]) -> bool:
    """Whether the live nodes' total resources (used or not) hold ``bundles``, first fit,
    largest first; the strategies used here are soft, so a group may span nodes."""
    import ray

    free = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        for node in free:
            if all(node.get(k, 0.0) >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] -= v
                break
        else:
            return False
    return True


def wait_for_nodes(
    bundles: list[Bundle],
    strategy: str,
    wait_s: float,
    scaler: Autoscaler,
    option: str,
    shortfall: str,
) -> float:
    """Have the autoscaler add nodes for ``bundles`` and wait until they are placed; the
    seconds waited. Raises ConfigError naming ``option`` when no node type can hold them (v2),
    or naming --wait-for-resources when ``wait_s`` runs out first."""
    from ray.util.placement_group import placement_group, remove_placement_group

    shape = describe(bundles)
    start = time.monotonic()
    pg = placement_group(bundles, strategy=strategy)
    print(
        f"The live nodes cannot hold {shape} ({shortfall}); waiting up to {wait_s:g} s "
        f"(--wait-for-resources) for the cluster's autoscaler ({scaler}) to add nodes",
        flush=True,
    )
    next_note = start + PROGRESS_EVERY_S
    try:
        while True:
            if pg.wait(timeout_seconds=1):
                waited = time.monotonic() - start
                print(f"{shape} placed after {waited:.0f} s: {live_capacity()}", flush=True)
                return waited
            now = time.monotonic()
            if scaler == "v2" and _infeasible(pg.id.hex(), bundles):
                raise ConfigError(
                    option,
                    f"{shape}: no node type of this cluster can hold it (its autoscaler reports "
                    f"the request infeasible; {shortfall})",
                )
            if now - start >= wait_s:
                raise ConfigError(
                    "--wait-for-resources",
                    f"waited {wait_s:g} s for the autoscaler to add nodes for {shape}, in vain: "
                    f"{live_capacity()} ({shortfall}); wait longer, or lower {option}",
                )
            if now >= next_note:
                print(
                    f"still waiting for {shape} ({now - start:.0f} of {wait_s:g} s): "
                    f"{live_capacity()}",
                    flush=True,
                )
                next_note += PROGRESS_EVERY_S
    finally:
        remove_placement_group(pg)


# The most a verdict is waited for (autoscaler v2 gives one within a round or two, 5 s each by
# default); without one, the request counts as feasible (the run then waits as usual).
VERDICT_TIMEOUT_S = 120.0


def can_ever_hold(bundles: list[Bundle], strategy: str = "PACK") -> bool:
    """Autoscaler v2's verdict on ``bundles``: False where no node type can ever hold them
    (_infeasible), True once they are placed or once the autoscaler has reported on a cluster
    state that holds the request without calling it infeasible. That state is the GCS's
    cluster-resource-state version in which the request first shows as pending; the autoscaler
    reports the last version it has seen (not a wall-clock guess: on a loaded machine a round
    takes longer than its interval). The probe is a placement group, removed after; a feasible
    one has the autoscaler start the nodes it needs (which the run or sweep then uses)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=strategy)
    pg_id = pg.id.hex()
    seen_in: int | None = None  # the state version in which the request shows as pending
    deadline = time.monotonic() + VERDICT_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if pg.wait(timeout_seconds=0.5):
                return True
            reply = _cluster_status()
            if reply is None:
                return True  # no autoscaler view: no verdict to wait for
            state = reply.cluster_resource_state
            if seen_in is None:
                if any(r.details.startswith(pg_id) for r in state.pending_gang_resource_requests):
                    seen_in = state.cluster_resource_state_version
                continue
            if reply.autoscaling_state.last_seen_cluster_resource_state_version >= seen_in:
                return not _infeasible(pg_id, bundles, reply)
        return True
    finally:
        remove_placement_group(pg)


def most_that_fit(one: list[Bundle], cap: int) -> int:
    """The most copies of ``one`` (up to ``cap``) that the cluster can hold at its largest, by
    autoscaler v2's verdicts (a binary search, the largest first): 0 where not even one."""
    if can_ever_hold(one * cap):
        return cap
    low, high = 0, cap - 1  # low: known to fit (0 trivially); high: the most still possible
    while low < high:
        mid = (low + high + 1) // 2
        if can_ever_hold(one * mid):
            low = mid
        else:
            high = mid - 1
    return low
