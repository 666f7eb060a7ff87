"""This host as a Kubernetes Node: registered with its address, labels, taint and capacity, kept
Ready by a Lease in ``kube-node-lease`` renewed every ``renew_interval`` (the kubelet's heartbeat)
and a status written every ``status_interval``, and marked NotReady on a clean exit so that its pods
leave the Services' endpoints at once instead of after the lease runs out.

An API server that cannot be reached is logged once per outage; the heartbeat keeps trying.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import platform

from .status import now

log = logging.getLogger("wakegate.kube")

LEASE_NAMESPACE = "kube-node-lease"
NODE_TYPE_LABEL = "type"  # virtual-kubelet's convention: pods can select such nodes by it
NODE_TYPE = "wakegate"


def micro_now() -> str:
    """A MicroTime, as Lease.spec.renewTime wants it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            continue
    return ""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class NodeAgent:
    """The Node object and its heartbeat; the only writer of both."""

    def __init__(self, client, settings, version: str) -> None:
        self.client = client
        self.settings = settings
        self.version = version
        self.name = settings.node_name
        self.uid = ""
        self.ready_since = now()
        self.unreachable = False  # an outage is under way (logged once)
        self._task: asyncio.Task | None = None

    # ---- what the Node says ----

    def labels(self) -> dict:
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        return {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": arch,
                "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": arch, NODE_TYPE_LABEL: NODE_TYPE,
                **dict(self.settings.labels)}

    def taints(self, existing: list | None = None) -> list:
        """Ours, and any others (the node lifecycle controller's) kept as they are."""
        ours = []
        if self.settings.taint is not None:
            key, value, effect = self.settings.taint
            ours.append({"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect})
        ours_keys = {(t["key"], t["effect"]) for t in ours}
        configured = {self.settings.taint[0]} if self.settings.taint else set()
        kept = [t for t in existing or [] if (t.get("key"), t.get("effect")) not in ours_keys
                and not (t.get("key", "").startswith("wakegate.dev/") and t.get("key") not in configured)]
        return kept + ours

    def conditions(self, ready: bool, reason: str, message: str) -> list:
        stamp = now()
        if ready:
            transition = self.ready_since
        else:
            transition = stamp
        out = [{"type": "Ready", "status": "True" if ready else "False", "reason": reason, "message": message,
                "lastHeartbeatTime": stamp, "lastTransitionTime": transition}]
        for kind, why in (("MemoryPressure", "KubeletHasSufficientMemory"), ("DiskPressure", "KubeletHasNoDiskPressure"),
                          ("PIDPressure", "KubeletHasSufficientPID")):
            out.append({"type": kind, "status": "False", "reason": why, "message": "wakegate does not evict",
                        "lastHeartbeatTime": stamp, "lastTransitionTime": self.ready_since})
        return out

    def status(self, ready: bool = True, reason: str = "KubeletReady",
               message: str = "wakegate is serving its pods") -> dict:
        capacity = dict(self.settings.capacity)
        uname = os.uname()
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": self.conditions(ready, reason, message),
            "addresses": [{"type": "InternalIP", "address": self.settings.node_address},
                          {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {"machineID": _machine_id(), "systemUUID": _machine_id(), "bootID": _boot_id(),
                         "kernelVersion": uname.release, "osImage": "wakegate", "operatingSystem": "linux",
                         "architecture": self.labels()["kubernetes.io/arch"],
                         "containerRuntimeVersion": f"wakegate://{self.version}",
                         "kubeletVersion": f"v1.20.0-wakegate.{self.version}", "kubeProxyVersion": ""},
        }

    # ---- registration and heartbeat ----

    async def register(self) -> None:
        """Create the Node, or take over the one an earlier wakegate of this node left."""
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        try:
            node = await self.client.get(Node, self.name)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            body = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": self.name, "labels": self.labels()},
                    "spec": {"taints": self.taints()}}
            node = await self.client.create(Node.from_dict(body))
            log.info("kubernetes: node %s registered (address %s)", self.name, self.settings.node_address)
        else:
            taints = [t.to_dict() for t in (node.spec.taints or [])] if node.spec else []
            node = await self.client.patch(Node, self.name, {"metadata": {"labels": self.labels()},
                                                             "spec": {"taints": self.taints(taints)}},
                                           patch_type=PatchType.MERGE)
            log.info("kubernetes: node %s taken over (address %s)", self.name, self.settings.node_address)
        self.uid = node.metadata.uid
        self.ready_since = now()
        await self.write_status()
        await self.renew()

    async def write_status(self, ready: bool = True, reason: str = "KubeletReady",
                           message: str = "wakegate is serving its pods") -> None:
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        await self.client.patch(Node.Status, self.name, {"status": self.status(ready, reason, message)},
                                patch_type=PatchType.STRATEGIC)

    async def renew(self) -> None:
        """The heartbeat: the node's Lease, renewed (made if it is missing)."""
        from lightkube import ApiError
        from lightkube.resources.coordination_v1 import Lease
        from lightkube.types import PatchType

        spec = {"holderIdentity": self.name, "leaseDurationSeconds": int(self.settings.lease_duration),
                "renewTime": micro_now()}
        try:
            await self.client.patch(Lease, self.name, {"spec": spec}, namespace=LEASE_NAMESPACE,
                                    patch_type=PatchType.MERGE)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            owner = [{"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.uid}] if self.uid else []
            await self.client.create(Lease.from_dict({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": LEASE_NAMESPACE, "ownerReferences": owner},
                "spec": spec}))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._heartbeat(), name="kube-node-heartbeat")

    async def _heartbeat(self) -> None:
        registered = False
        loop = asyncio.get_running_loop()
        next_status = 0.0
        while True:
            try:
                if not registered:
                    await self.register()
                    registered = True
                    next_status = loop.time() + self.settings.status_interval
                else:
                    await self.renew()
                    if loop.time() >= next_status:
                        await self.write_status()
                        next_status = loop.time() + self.settings.status_interval
                if self.unreachable:
                    log.info("kubernetes: the API server answers again")
                    self.unreachable = False
                    await self.write_status()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self.unreachable:
                    log.warning("kubernetes: node %s heartbeat failed: %s; retrying every %gs", self.name,
                                describe_error(exc), self.settings.renew_interval)
                    self.unreachable = True
            await asyncio.sleep(self.settings.renew_interval)

    async def stop(self) -> None:
        """A clean exit: no more heartbeats, and the node NotReady now (its pods leave the endpoints)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        try:
            await asyncio.wait_for(self.write_status(False, "WakegateStopped", "wakegate stopped on this node"), 5.0)
            log.info("kubernetes: node %s marked NotReady", self.name)
        except Exception as exc:
            log.warning("kubernetes: cannot mark node %s NotReady: %s", self.name, describe_error(exc))


def describe_error(exc: BaseException) -> str:
    """One line for an API failure: the server's own message when it sent one."""
    from lightkube import ApiError

    if isinstance(exc, ApiError) and exc.status.message:
        return f"{exc.status.code} {exc.status.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# What a node does in the API, as deploy/kubernetes/rbac.yaml grants it: (verb, resource, subresource,
# API group, namespace). `wakegate check` asks the API server about each one for these credentials.
NEEDED = (
    ("get", "nodes", "", "", ""), ("create", "nodes", "", "", ""), ("patch", "nodes", "", "", ""),
    ("patch", "nodes", "status", "", ""),
    ("list", "pods", "", "", ""), ("watch", "pods", "", "", ""), ("delete", "pods", "", "", ""),
    ("patch", "pods", "status", "", ""),
    ("create", "leases", "", "coordination.k8s.io", LEASE_NAMESPACE),
    ("patch", "leases", "", "coordination.k8s.io", LEASE_NAMESPACE),
)
AUDIT_TIMEOUT = 10.0  # `wakegate check` gives the API server this long


async def audit(settings) -> tuple[list[str], list[str]]:
    """``wakegate check`` with [kubernetes]: (found, problems), one line each. Reaches the API
    server with the configured credentials and asks it (SelfSubjectAccessReview) whether they may do
    each thing a node does."""
    from lightkube import ApiError
    from lightkube.resources.authorization_v1 import SelfSubjectAccessReview
    from lightkube.resources.core_v1 import Node

    from .agent import make_client

    found, problems = [], []
    try:
        client = make_client(settings)
    except Exception as exc:  # a service account that is not there, a kubeconfig lightkube refuses
        return found, [f"kubernetes: {describe_error(exc)}"]
    server = client.config.cluster.server
    try:
        async def ask() -> None:
            missing = []
            for verb, resource, sub, group, namespace in NEEDED:
                review = SelfSubjectAccessReview.from_dict({
                    "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                    "spec": {"resourceAttributes": {"verb": verb, "resource": resource, "subresource": sub,
                                                    "group": group, "namespace": namespace}}})
                answer = await client.create(review)
                if not answer.status.allowed:
                    missing.append(f"{verb} {resource}{'/' + sub if sub else ''}"
                                   f"{' in ' + namespace if namespace else ''}")
            if missing:
                problems.append(f"kubernetes: the credentials may not {', '.join(missing)}: apply "
                                "deploy/kubernetes/rbac.yaml and put them in the group wakegate:nodes")
            found.append(f"kubernetes: API server {server} answers; the credentials may do what a node does"
                         if not missing else f"kubernetes: API server {server} answers")
            try:
                await client.get(Node, settings.node_name)
                found.append(f"kubernetes: node {settings.node_name} exists (wakegate takes it over)")
            except ApiError as exc:
                if exc.status.code == 404:
                    found.append(f"kubernetes: node {settings.node_name} is not registered yet")
                elif exc.status.code != 403:
                    raise

        await asyncio.wait_for(ask(), AUDIT_TIMEOUT)
    except asyncio.TimeoutError:
        problems.append(f"kubernetes: the API server at {server} did not answer within {AUDIT_TIMEOUT:g}s")
    except Exception as exc:
        problems.append(f"kubernetes: cannot use the API server at {server}: {describe_error(exc)}")
    finally:
        await client.close()
    return found, problems
