"""What Kubernetes sees of a pod on a wakegate node: its status, as the kubelet would write it.

A pod whose service is set up is Running and Ready whether its service is awake or asleep ("green
all the time"): a request wakes it in milliseconds. It is not Ready only while its service is FAILED
(a crash loop or a wake that failed), or when it cannot run at all (``waiting`` with the reason).
Pure: ``pod_status(report)`` is the body written through the pod's status subresource.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field


def now() -> str:
    """An RFC 3339 time in whole seconds, as Kubernetes writes them."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Terminated:
    """How the container's last run ended (lastState.terminated)."""

    exit_code: int
    reason: str  # Completed (exit 0) or Error, as the kubelet says
    started_at: str
    finished_at: str


@dataclass
class PodReport:
    """Everything the status is made from; the agent keeps one per pod and changes it in place."""

    container: str
    image: str
    node_address: str
    started_at: str = field(default_factory=now)  # the pod's startTime: when wakegate set it up
    running_since: str = ""  # the container's state.running.startedAt
    waiting: tuple[str, str] | None = None  # (reason, message): not running
    ready: bool = False
    restarts: int = 0
    last: Terminated | None = None
    container_id: str = ""  # docker://ID, or wakegate://SERVICE for a process or a microVM
    transitions: dict = field(default_factory=dict)  # condition type -> (status, lastTransitionTime)

    def key(self) -> tuple:
        """What a write would change: two reports with the same key need no second write."""
        return (self.waiting, self.ready, self.restarts, self.running_since, self.container_id,
                None if self.last is None else self.last.finished_at)


def _condition(report: PodReport, kind: str, status: bool, reason: str = "", message: str = "") -> dict:
    value = "True" if status else "False"
    previous = report.transitions.get(kind)
    if previous is None or previous[0] != value:
        previous = report.transitions[kind] = (value, now())
    out = {"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": previous[1]}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out


def pod_status(report: PodReport) -> dict:
    """The pod's status (for a merge patch of the status subresource: lists are replaced whole)."""
    ready = report.ready and report.waiting is None
    not_ready = "" if ready else "ContainersNotReady"
    message = "" if ready else f"containers with unready status: [{report.container}]"
    container = {"name": report.container, "image": report.image, "imageID": "", "ready": ready,
                 "restartCount": report.restarts, "started": report.waiting is None}
    if report.container_id:
        container["containerID"] = report.container_id
    if report.waiting is not None:
        container["state"] = {"waiting": {"reason": report.waiting[0], "message": report.waiting[1]}}
    else:
        container["state"] = {"running": {"startedAt": report.running_since or report.started_at}}
    container["lastState"] = {} if report.last is None else {"terminated": {
        "exitCode": report.last.exit_code, "reason": report.last.reason, "startedAt": report.last.started_at,
        "finishedAt": report.last.finished_at}}
    running = report.waiting is None or report.restarts > 0 or report.running_since
    return {
        "phase": "Running" if running else "Pending",
        "conditions": [
            _condition(report, "Initialized", True),
            _condition(report, "Ready", ready, not_ready, message),
            _condition(report, "ContainersReady", ready, not_ready, message),
            _condition(report, "PodScheduled", True),
        ],
        "hostIP": report.node_address,
        "podIP": report.node_address,
        "podIPs": [{"ip": report.node_address}],
        "startTime": report.started_at,
        "containerStatuses": [container],
    }


def matches(status: dict, report: PodReport) -> bool:
    """Whether a status read back from the server says what the report says (if not, someone else
    wrote it, the node lifecycle controller marking the pod not ready, say: write ours again)."""
    ready = report.ready and report.waiting is None
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    containers = status.get("containerStatuses") or [{}]
    return (conditions.get("Ready") == ("True" if ready else "False") and status.get("podIP") == report.node_address
            and containers[0].get("restartCount") == report.restarts
            and ("waiting" in (containers[0].get("state") or {})) == (report.waiting is not None))
