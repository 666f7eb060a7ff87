"""The node agent in a running wakegate: it follows the pods bound to this node and runs each as a
service (set up asleep, its containerPort served on the node's address), reports them Running and
Ready while their services sleep and wake, and on a pod's deletion drains its requests, stops it,
and confirms the deletion to Kubernetes.

Each pod has one task that handles its events in order (a slow Engine call holds up no other pod);
the services change through the runtime's reload path, like discovered containers; pod status is
written by one writer task that sends only what changed. ``KubeNode`` is what the runtime starts
and closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from urllib.parse import quote

from ..ports import free_port
from .node import NodeAgent, describe_error
from .pods import CannotRun, PodPlan, plan_pod
from .status import PodReport, Terminated, matches, now, pod_status

log = logging.getLogger("wakegate.kube")

RELIST_BACKOFF_MIN = 0.2  # the pod watch broke: list again after this, doubling ...
RELIST_BACKOFF_MAX = 10.0  # ... up to this (client-go's reflector backs off to 30 s; a node must come back sooner)
WATCH_TIMEOUT = 300  # seconds a watch request lasts before it is made again (the kubelet's is 5-10 min)
STATUS_RETRY = 1.0  # a status write that failed is tried again after this
API_TIMEOUT = 10.0  # any other API call
EXIT_CODE_UNKNOWN = 255
# Reasons that go away when another pod does (its port, its hosts): such pods are tried again then.
CLAIM_REASONS = ("PortConflict", "PortInUse", "HostConflict", "NameConflict")


def make_client(settings):
    """An asyncio lightkube client from a kubeconfig file or the pod's service account."""
    from lightkube import AsyncClient
    from lightkube.config.kubeconfig import KubeConfig

    config = KubeConfig.from_service_account() if settings.in_cluster else KubeConfig.from_file(settings.kubeconfig)
    return AsyncClient(config, field_manager="wakegate", timeout=_timeout())


def _timeout():
    import httpx2

    return httpx2.Timeout(API_TIMEOUT)


class Pod:
    """One pod as the agent knows it: its plan (or why it cannot run), its report, its event queue."""

    def __init__(self, uid: str, namespace: str, name: str) -> None:
        self.uid, self.namespace, self.name = uid, namespace, name
        self.plan: PodPlan | None = None
        self.report: PodReport | None = None
        self.fingerprint = None  # what the plan was made from
        self.raw: dict | None = None  # the pod as last seen
        self.upstream_port = 0
        self.events: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.deleting = False
        self.gone = False
        self.exits_seen = 0
        self.restart_pending = False
        self.written = None  # the report key last written

    @property
    def service(self) -> str | None:
        return self.plan.service.name if self.plan is not None else None

    def __repr__(self) -> str:
        return f"pod {self.namespace}/{self.name}"


class KubeNode:
    """The Kubernetes node this wakegate is: the Node and its heartbeat, and the pods bound to it."""

    def __init__(self, runtime, settings, version: str) -> None:
        self.runtime = runtime
        self.settings = settings
        self.version = version
        self.client = None
        self.node: NodeAgent | None = None
        self.pods: dict[str, Pod] = {}  # uid -> pod
        self.services: dict = {}  # service name -> ServiceConfig: what the runtime merges into its config
        self.base_dir = os.path.dirname(os.path.abspath(runtime.config.path))
        self.engine = None  # the Docker Engine of pods' containers, once one needs it
        self._dirty: set[str] = set()  # uids whose status must be written
        self._wake_writer = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._planning = asyncio.Lock()  # one pod set up at a time: port and host claims are checked whole
        self.synced = asyncio.Event()  # the first list of pods is dispatched

    # ---- life ----

    async def start(self) -> None:
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per API call otherwise
        self.client = make_client(self.settings)
        self.node = NodeAgent(self.client, self.settings, self.version)
        self.node.start()
        self.runtime.controller.observers.append(self._observe)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow_pods(), name="kube-pods"),
                       loop.create_task(self._write_statuses(), name="kube-status")]

    async def stop_serving(self) -> None:
        """wakegate is stopping: the node NotReady and every pod not ready at once, so clients move
        away while the requests in flight finish."""
        for pod in self.pods.values():
            if pod.report is not None and pod.report.ready:
                pod.report.ready = False
                self._dirty.add(pod.uid)
        if self.node is not None:
            await self.node.stop()
        if self._dirty and self.client is not None:
            try:
                await asyncio.wait_for(self._flush_statuses(), 5.0)
            except asyncio.TimeoutError:
                log.warning("kubernetes: the pods' status was not written within 5s of the stop")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for pod in self.pods.values():
            if pod.task is not None:
                pod.task.cancel()
        tasks = self._tasks + [p.task for p in self.pods.values() if p.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        if self._observe in self.runtime.controller.observers:
            self.runtime.controller.observers.remove(self._observe)
        if self.engine is not None:
            await self.engine.release()
            self.engine = None
        if self.client is not None:
            await self.client.close()
            self.client = None

    # ---- the pods bound to this node ----

    async def _follow_pods(self) -> None:
        """List the node's pods, then watch them; on any break, list again (pods deleted meanwhile
        are noticed by their absence from the new list)."""
        from lightkube.resources.core_v1 import Pod as PodResource

        fields = {"spec.nodeName": self.settings.node_name}
        backoff = RELIST_BACKOFF_MIN
        warned = False
        while True:
            try:
                listing = self.client.list(PodResource, namespace="*", fields=fields)
                seen = set()
                async for obj in listing:
                    raw = obj.to_dict()
                    seen.add(raw["metadata"]["uid"])
                    self._dispatch("seen", raw)
                version = listing.resourceVersion if seen else None
                for uid in [u for u in self.pods if u not in seen]:
                    self._dispatch("gone", {"metadata": {"uid": uid}})
                self.synced.set()
                if warned:
                    log.info("kubernetes: following the pods of node %s again", self.settings.node_name)
                warned = False
                backoff = RELIST_BACKOFF_MIN
                async for kind, obj in self.client.watch(PodResource, namespace="*", fields=fields,
                                                         resource_version=version, server_timeout=WATCH_TIMEOUT):
                    raw = obj.to_dict()
                    self._dispatch("gone" if kind == "DELETED" else "seen", raw)
                continue  # the watch ended on its own: list again
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not warned:
                    log.warning("kubernetes: following the pods of node %s: %s; trying again", self.settings.node_name,
                                describe_error(exc))
                    warned = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RELIST_BACKOFF_MAX)

    def _dispatch(self, kind: str, raw: dict) -> None:
        meta = raw["metadata"]
        uid = meta["uid"]
        pod = self.pods.get(uid)
        if pod is None:
            if kind == "gone":
                return
            pod = self.pods[uid] = Pod(uid, meta.get("namespace", "default"), meta.get("name", ""))
            pod.task = asyncio.get_running_loop().create_task(self._run_pod(pod), name=f"kube-pod-{pod.name}")
        pod.events.put_nowait((kind, raw))

    async def _run_pod(self, pod: Pod) -> None:
        """One pod's events, in order."""
        while not pod.gone:
            events = [await pod.events.get()]
            while not pod.events.empty():  # only the latest state matters, and whether it went
                events.append(pod.events.get_nowait())
            kind, raw = events[-1]
            if any(k == "gone" for k, _ in events):
                kind = "gone"
            try:
                if kind == "gone":
                    await self._teardown(pod, confirm=False)
                elif (raw["metadata"].get("deletionTimestamp")):
                    await self._teardown(pod, confirm=True)
                else:
                    await self._seen(pod, raw)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: handling it failed", pod)
        self.pods.pop(pod.uid, None)

    async def _seen(self, pod: Pod, raw: dict) -> None:
        """A pod added or changed: set it up the first time, again when what it runs changed."""
        spec, meta = raw.get("spec") or {}, raw["metadata"]
        pod.raw = raw
        fingerprint = (repr(spec.get("containers")), repr(sorted((meta.get("annotations") or {}).items())))
        if fingerprint == pod.fingerprint:
            if pod.report is not None and not matches(raw.get("status") or {}, pod.report):
                self._mark(pod)  # someone else wrote its status (the node lifecycle controller): ours again
            return
        pod.fingerprint = fingerprint
        if pod.report is None:
            pod.report = self._report_from(raw)
        try:
            async with self._planning:
                plan = await self._plan(pod, raw)
        except CannotRun as refused:
            log.warning("%s: cannot run on this node: %s", pod, refused)
            if pod.plan is not None:
                await self._remove_service(pod)
                pod.plan = None
            pod.report.waiting = (refused.reason, refused.message)
            pod.report.ready = False
            self._mark(pod)
            return
        pod.report.container_id = (f"docker://{plan.docker_name}" if plan.kind == "container"
                                   else f"wakegate://{plan.service.name}")
        pod.report.waiting = None
        pod.report.ready = True
        pod.report.running_since = pod.report.running_since or now()
        self._mark(pod)
        log.info("%s: runs as service %s (%s, sleep %s), port %d on %s", pod, plan.service.name, plan.kind,
                 plan.service.sleep, plan.port, self.settings.node_address)

    def _report_from(self, raw: dict) -> PodReport:
        """A report that keeps what an earlier wakegate of this node told (start time, restarts)."""
        container = ((raw.get("spec") or {}).get("containers") or [{}])[0]
        status = raw.get("status") or {}
        report = PodReport(container=container.get("name", ""), image=container.get("image", ""),
                           node_address=self.settings.node_address)
        if status.get("startTime"):
            report.started_at = status["startTime"]
        earlier = (status.get("containerStatuses") or [{}])[0]
        report.restarts = int(earlier.get("restartCount") or 0)
        return report

    async def _plan(self, pod: Pod, raw: dict) -> PodPlan:
        """Make the pod's service and apply it, or raise CannotRun."""
        if not pod.upstream_port:
            pod.upstream_port = free_port()
        plan = plan_pod(raw, self.settings, upstream_port=pod.upstream_port, base_dir=self.base_dir)
        name = plan.service.name
        if name in self.runtime.file_config.services:
            raise CannotRun("NameConflict", f"service {name!r} exists in wakegate's config file")
        for other in self.pods.values():
            if other is pod or other.plan is None or other.deleting:
                continue  # a pod being deleted no longer takes requests: its port is free for others
            if other.plan.port == plan.port and other.plan.replicas != plan.replicas:
                raise CannotRun("PortConflict", f"containerPort {plan.port} is served on this node's address for "
                                f"{other}, which is not a replica of this pod (pods on a wakegate node share the "
                                "node's address; only replicas of one app may share a port)")
        from ..discovery import conflicts

        routed = {k: v for k, v in self.runtime.routed().items() if v != name}
        clash = conflicts(plan.service, routed)
        if clash:
            raise CannotRun("HostConflict", f"{', '.join(clash)} already routed")
        for address in plan.service.listen:
            try:
                self.runtime.open_listener(address)
            except OSError as exc:
                raise CannotRun("PortInUse", f"cannot listen on {address}: {exc.strerror or exc}") from None
        if plan.kind == "container":
            await self._ensure_container(plan)
        self.services[name] = plan.service
        if pod.plan is not None and pod.plan.service.name != name:
            self.services.pop(pod.plan.service.name, None)
        result = await self.runtime.rediscover("kubernetes")
        if not result.get("ok"):
            self.services.pop(name, None)
            raise CannotRun("CreateContainerConfigError", result.get("error", "wakegate refused the service"))
        pod.plan = plan
        return plan

    async def _ensure_container(self, plan: PodPlan) -> None:
        """The pod's container on the Engine: made from its image if missing, made again if the pod
        changed; the image must be on the node (nothing is pulled)."""
        from ..docker import DockerEngine, EngineError

        if self.engine is None:
            self.engine = DockerEngine.acquire(self.settings.docker_socket, API_TIMEOUT)
        try:
            await self.engine.call("GET", f"/images/{quote(plan.image, safe='')}/json", ok=(200,))
        except EngineError as exc:
            if " 404 " in str(exc) + " ":
                raise CannotRun("ErrImageNeverPull", f'image "{plan.image}" is not on this node, and a wakegate node '
                                "pulls nothing: load it into the node's Docker Engine (docker load, docker pull)") from None
            raise CannotRun("CreateContainerError", str(exc)) from None
        try:
            info = await self.engine.call("GET", f"/containers/{plan.docker_name}/json", ok=(200,))
        except EngineError:
            info = None
        wanted = plan.docker_create["Labels"]["wakegate.dev/spec"]
        if info is not None and (info.get("Config") or {}).get("Labels", {}).get("wakegate.dev/spec") != wanted:
            await self.engine.call("DELETE", f"/containers/{plan.docker_name}", params={"force": "1"}, ok=(204, 404))
            info = None
        if info is None:
            try:
                await self.engine.call("POST", "/containers/create", params={"name": plan.docker_name},
                                       body=plan.docker_create, ok=(201,))
            except EngineError as exc:
                raise CannotRun("CreateContainerError", str(exc)) from None

    async def _remove_service(self, pod: Pod) -> None:
        """Take the pod's service out: its requests drain, then its process, VM or container stops."""
        name = pod.service
        if name is None:
            return
        self.services.pop(name, None)
        if name in self.runtime.config.services:
            await self.runtime.rediscover("kubernetes")
        await self.runtime.controller.gone(name)

    async def _teardown(self, pod: Pod, confirm: bool) -> None:
        """The pod is being deleted (confirm: tell Kubernetes it is gone once it is), or is gone."""
        if pod.deleting:
            return
        pod.deleting = True
        await self._remove_service(pod)
        if pod.plan is not None and pod.plan.kind == "container" and self.engine is not None:
            try:
                await self.engine.call("DELETE", f"/containers/{pod.plan.docker_name}", params={"force": "1"},
                                       ok=(204, 404))
            except Exception as exc:
                log.warning("%s: removing its container: %s", pod, exc)
        self._dirty.discard(pod.uid)
        if confirm:
            from lightkube import ApiError
            from lightkube.resources.core_v1 import Pod as PodResource

            try:
                await self.client.delete(PodResource, pod.name, namespace=pod.namespace, grace_period=0)
            except ApiError as exc:
                if exc.status.code != 404:
                    log.warning("%s: confirming its deletion: %s", pod, describe_error(exc))
        log.info("%s: %s", pod, "deleted" if confirm else "gone")
        pod.gone = True
        for other in self.pods.values():  # what it claimed is free: pods that waited for it try again
            if other.report is not None and other.report.waiting and other.report.waiting[0] in CLAIM_REASONS \
                    and other.raw is not None and not other.deleting:
                other.fingerprint = None
                other.events.put_nowait(("seen", other.raw))

    # ---- what the services do, as pod status ----

    def _observe(self, service, old, new) -> None:
        """A service changed state (called by its supervisor): what Kubernetes sees may change."""
        pod = next((p for p in self.pods.values() if p.service == service.name and not p.deleting), None)
        if pod is None or pod.report is None:
            return
        from ..service import ASLEEP, FAILED, READY, SLEEPING

        report = pod.report
        exits = service.sleep_reasons.get("exited", 0)
        if old is SLEEPING and exits > pod.exits_seen:  # it exited on its own: the next start is a restart
            pod.exits_seen = exits
            pod.restart_pending = True
            code = service.backend.exited().result() if service.backend.exited().done() else None
            code = code if isinstance(code, int) else EXIT_CODE_UNKNOWN
            report.last = Terminated(exit_code=code, reason="Completed" if code == 0 else "Error",
                                     started_at=report.running_since or report.started_at, finished_at=now())
            self._mark(pod)
        if new is READY and pod.restart_pending:
            pod.restart_pending = False
            report.restarts += 1
            report.running_since = now()
            report.waiting = None
            report.ready = True
            self._mark(pod)
        elif new is FAILED:
            reason = "CrashLoopBackOff" if pod.exits_seen else "RunContainerError"
            report.waiting = (reason, service.last_failure or "the service failed to start")
            report.ready = False
            self._mark(pod)
        elif old is FAILED and new is ASLEEP and report.waiting is not None:
            report.waiting = None  # the backoff is over: the next request starts it again
            report.ready = True
            self._mark(pod)

    def _mark(self, pod: Pod) -> None:
        self._dirty.add(pod.uid)
        self._wake_writer.set()

    async def _write_statuses(self) -> None:
        """The one writer of pod status: writes what changed, tries again what failed."""
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            failed = await self._flush_statuses()
            if failed:
                await asyncio.sleep(STATUS_RETRY)
                self._wake_writer.set()

    async def _flush_statuses(self) -> int:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod as PodResource
        from lightkube.types import PatchType

        failed = 0
        while self._dirty:
            uid = self._dirty.pop()
            pod = self.pods.get(uid)
            if pod is None or pod.report is None or pod.deleting:
                continue
            try:
                await self.client.patch(PodResource.Status, pod.name, {"status": pod_status(pod.report)},
                                        namespace=pod.namespace, patch_type=PatchType.MERGE)
                pod.written = pod.report.key()
            except ApiError as exc:
                if exc.status.code == 404:
                    continue
                log.warning("%s: writing its status: %s", pod, describe_error(exc))
                self._dirty.add(uid)
                failed += 1
                break
            except Exception as exc:
                log.warning("%s: writing its status: %s", pod, describe_error(exc))
                self._dirty.add(uid)
                failed += 1
                break
        return failed

    # ---- for the admin API and the tests ----

    def describe(self) -> list[dict]:
        out = []
        for pod in self.pods.values():
            report = pod.report
            out.append({"pod": f"{pod.namespace}/{pod.name}", "uid": pod.uid, "service": pod.service,
                        "kind": pod.plan.kind if pod.plan else None,
                        "ready": bool(report and report.ready and report.waiting is None),
                        "waiting": None if report is None or report.waiting is None else
                        {"reason": report.waiting[0], "message": report.waiting[1]},
                        "restarts": report.restarts if report else 0, "deleting": pod.deleting})
        return out

