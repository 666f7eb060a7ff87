"""Services from Docker labels: containers labelled ``wakegate.enable=true`` become services without
editing the TOML, picked up and dropped live from the Engine's events (what Sablier's users expect).

The labels (``wakegate.hosts``, ``wakegate.port`` ...) are read as a service table and validated
like one (config.service_from_labels); a container whose labels are wrong, or that claims a host
another service has, is logged with its name and left out. Replicas share a ``wakegate.service``
label and are one service. ``LiveServices`` is the only writer of the routing table and the
controller's service list after start-up.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from .config import ConfigError, ServiceConfig, service_from_labels
from .docker import DockerEngine, EngineError

log = logging.getLogger("wakegate.discovery")

ENABLE_LABEL = "wakegate.enable"


def conflicts(svc: ServiceConfig, routed: dict[tuple[str, str], str]) -> list[str]:
    """The (host + path, other service) pairs svc claims that another service already has."""
    out = []
    for host in svc.hosts:
        for prefix in svc.paths or ("",):
            other = routed.get((host, prefix))
            if other is not None and other != svc.name:
                out.append(f"{host}{prefix} (service {other})")
    return out


class LiveServices:
    """The discovered services, applied to the running wakegate with the config file's (the same
    path as a reload: controller/runtime.py), so every proxy process routes them."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.discovered: dict[str, ServiceConfig] = {}
        self._pending: set[asyncio.Task] = set()

    @property
    def routes(self) -> dict:
        """Every service running now, from the file or discovered."""
        return self.runtime.config.services

    @property
    def routed(self) -> dict[tuple[str, str], str]:
        """(host, path prefix) -> the service that claims it, discovered ones included."""
        claims = {}
        for svc in [*self.runtime.config.services.values(), *self.discovered.values()]:
            for host in svc.hosts:
                for prefix in svc.paths or ("",):
                    claims[(host, prefix)] = svc.name
        return claims

    def add(self, svc: ServiceConfig) -> None:
        self.discovered[svc.name] = svc
        log.info("service %s: discovered (%s), hosts %s", svc.name, svc.docker.describe(), ", ".join(svc.hosts))
        task = asyncio.get_running_loop().create_task(self.runtime.rediscover())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def remove(self, name: str) -> None:
        if self.discovered.pop(name, None) is None:
            return
        await self.runtime.forget(name)
        log.info("service %s: its containers are gone; removed", name)

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


class Discovery:
    """Follows one Engine for labelled containers and keeps LiveServices in step with them."""

    def __init__(self, live: LiveServices, socket: str, timeout: float = 10.0) -> None:
        self.live = live
        self.socket = socket
        self.timeout = timeout
        self.engine: DockerEngine | None = None
        self.members: dict[str, set[str]] = {}  # discovered service -> its containers' names
        self.declared: dict[str, ServiceConfig] = {}  # discovered service -> its config
        self._pending: set[asyncio.Task] = set()

    async def start(self) -> None:
        """List the labelled containers now, then follow the events. An Engine that cannot be reached
        is logged; the events stream keeps trying and the containers come in when it answers."""
        self.engine = DockerEngine.acquire(self.socket, self.timeout)
        self.engine.listen(self._on_event)
        try:
            await self.scan()
        except EngineError as exc:
            log.warning("discovery: %s; services appear once the Engine answers", exc)

    async def scan(self) -> None:
        listed = await self.engine.call("GET", "/containers/json", ok=(200,), params={
            "all": "1", "filters": orjson.dumps({"label": [f"{ENABLE_LABEL}=true"]}).decode()})
        for c in listed or []:
            self.consider((c.get("Names") or ["/" + c["Id"][:12]])[0].lstrip("/"), c.get("Labels") or {})

    def consider(self, container: str, labels: dict) -> None:
        if labels.get(ENABLE_LABEL) != "true":
            return
        try:
            svc = service_from_labels(container, labels, self.socket)
        except ConfigError as exc:
            log.error("discovery: %s; left out", exc)
            return
        members = self.members.get(svc.name)
        if members is not None:
            members.add(container)  # one more replica of a known service
            return
        if svc.name in self.live.routes:
            log.error("discovery: container %s: service %r exists in the config; left out", container, svc.name)
            return
        clash = conflicts(svc, self.live.routed)
        if clash:
            log.error("discovery: container %s: %s already routed; left out", container, ", ".join(clash))
            return
        self.members[svc.name] = {container}
        self.declared[svc.name] = svc
        self.live.add(svc)

    def _on_event(self, event: dict) -> None:
        action = event.get("Action") or ""
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        if attributes.get(ENABLE_LABEL) != "true":
            return
        container = attributes.get("name", "")
        if action == "create":
            self.consider(container, attributes)
        elif action == "destroy":
            for name, members in list(self.members.items()):
                members.discard(container)
                if not members:
                    del self.members[name]
                    self.declared.pop(name, None)
                    task = asyncio.get_running_loop().create_task(self.live.remove(name))
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.live.close()
        if self.engine is not None:
            self.engine.unlisten(self._on_event)
            await self.engine.release()
            self.engine = None


async def audit(config) -> tuple[list[str], list[str]]:
    """``wakegate check`` with discovery: (found, problems), one line per labelled container, each
    naming the container; problems are wrong labels and hosts that two services claim."""
    engine = DockerEngine.acquire(config.discovery.socket, 10.0)
    found, problems = [], []
    try:
        listed = await engine.call("GET", "/containers/json", ok=(200,), params={
            "all": "1", "filters": orjson.dumps({"label": [f"{ENABLE_LABEL}=true"]}).decode()})
    except EngineError as exc:
        return found, [f"docker.socket: {exc}"]
    finally:
        await engine.release()
    routed: dict[tuple[str, str], str] = {}
    for svc in config.services.values():
        for host in svc.hosts:
            for prefix in svc.paths or ("",):
                routed[(host, prefix)] = svc.name
    owners: dict[str, str] = {}  # discovered service -> the container that declared it first
    for c in sorted(listed or [], key=lambda c: c.get("Names", [""])[0]):
        container = (c.get("Names") or ["/" + c["Id"][:12]])[0].lstrip("/")
        try:
            svc = service_from_labels(container, c.get("Labels") or {}, config.discovery.socket)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if svc.name in owners:
            found.append(f"container {container}: a replica of service {svc.name}")
            continue
        if svc.name in config.services:
            problems.append(f"container {container}: service {svc.name!r} exists in the config")
            continue
        clash = conflicts(svc, routed)
        if clash:
            problems.append(f"container {container}: claims {', '.join(clash)}")
            continue
        owners[svc.name] = container
        for host in svc.hosts:
            for prefix in svc.paths or ("",):
                routed[(host, prefix)] = f"{svc.name}, container {container}"
        found.append(f"container {container}: service {svc.name}, hosts {', '.join(svc.hosts)}")
    return found, problems

