"""A service that is a Docker container, or every container a label selector matches, put to sleep
and woken through the Docker Engine API on its Unix socket (aiohttp, a timeout on every call).

``pause`` uses the Engine's pause/unpause (memory kept), ``stop`` its stop/start (memory freed).
One ``DockerEngine`` per socket follows the Engine's ``/events`` stream for every service on it, so
a container that dies, or is started by someone else, is known within milliseconds: a death ends
the service's wake (in-flight requests get 502 from the proxy; the next request starts it again),
and a container started by hand while its service sleeps wakes the service without a start call.
Events that wakegate's own calls caused are told apart by their time: a death older than the
current wake, or a start older than the last sleep, is ours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable
from urllib.parse import quote

import aiohttp
import orjson

from .backends import SharedStop
from .readiness import ATTEMPT_FIRST, probe_until_ready

log = logging.getLogger("wakegate.docker")

API = "/v1.41"  # Debian 12's Engine (20.10) speaks 1.41, and later Engines still accept it
EVENTS_RETRY_MIN = 0.1  # the events stream broke: reconnect after this, doubling ...
EVENTS_RETRY_MAX = 5.0  # ... up to this (dockerd restarting takes ~0.5 s here)
DIED = ("die", "destroy", "oom")  # the container's process is gone
STARTED = ("start", "unpause")
NEVER = 2**63  # a time no event has: while wakegate's own calls run


class EngineError(RuntimeError):
    """The Engine refused a call, or could not be reached in time; the message says which."""


def from_config(svc, instance: str = "default") -> "DockerBackend":
    """controller.BACKENDS: a service with a [services.NAME.docker] table."""
    return DockerBackend(svc.name, svc.docker, mode=svc.sleep, host=svc.upstream.host, port=svc.upstream.port,
                         ready_path=svc.ready_path, ready_timeout=svc.wake_timeout)


class DockerEngine:
    """One Engine socket: an HTTP session and one /events stream shared by the services on it.
    ``acquire``/``release`` count the users; the last release closes both."""

    _open: dict[str, "DockerEngine"] = {}

    def __init__(self, socket_path: str, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.users = 0
        self._session: aiohttp.ClientSession | None = None
        self._events: asyncio.Task | None = None
        self._listeners: set[Callable[[dict], None]] = set()
        self.events_connected = asyncio.Event()

    @classmethod
    def acquire(cls, socket_path: str, timeout: float) -> "DockerEngine":
        engine = cls._open.get(socket_path)
        if engine is None:
            engine = cls._open[socket_path] = cls(socket_path, timeout)
        engine.users += 1
        return engine

    async def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        if DockerEngine._open.get(self.socket_path) is self:
            del DockerEngine._open[self.socket_path]
        if self._events is not None:
            self._events.cancel()
            try:
                await self._events
            except (asyncio.CancelledError, Exception):
                pass
            self._events = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket_path),
                                                  json_serialize=lambda o: orjson.dumps(o).decode())
        return self._session

    async def call(self, method: str, path: str, *, params: dict | None = None, timeout: float | None = None,
                   ok: tuple[int, ...] = (200, 201, 204, 304), body: dict | None = None):
        """One Engine API call (body: a JSON request body); its JSON answer (None when empty), or EngineError."""
        limit = timeout if timeout is not None else self.timeout
        try:
            async with self._client().request(method, f"http://docker{API}{path}", params=params, json=body,
                                              timeout=aiohttp.ClientTimeout(total=limit)) as resp:
                body = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            raise EngineError(f"the Docker Engine at {self.socket_path} did not answer {method} {path} "
                              f"within {limit:g}s") from None
        except aiohttp.ClientError as exc:
            raise EngineError(f"cannot reach the Docker Engine at {self.socket_path}: {exc}") from None
        if status not in ok:
            try:
                message = orjson.loads(body).get("message", "")
            except (orjson.JSONDecodeError, AttributeError):
                message = body[:200].decode(errors="replace")
            raise EngineError(f"Docker Engine: {method} {path}: {status} {message}".rstrip())
        return orjson.loads(body) if body.strip() else None

    # ---- events ----

    def listen(self, listener: Callable[[dict], None]) -> None:
        self._listeners.add(listener)
        if self._events is None:
            self._events = asyncio.get_running_loop().create_task(self._follow(), name=f"docker-events {self.socket_path}")

    def unlisten(self, listener: Callable[[dict], None]) -> None:
        self._listeners.discard(listener)

    async def _follow(self) -> None:
        """Read the /events stream for containers forever; reconnect with a backoff when it breaks."""
        retry = EVENTS_RETRY_MIN
        filters = orjson.dumps({"type": ["container"]}).decode()
        warned = False
        while True:
            try:
                async with self._client().get(f"http://docker{API}/events", params={"filters": filters},
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)) as resp:
                    if resp.status != 200:
                        raise EngineError(f"GET /events: {resp.status}")
                    self.events_connected.set()
                    if warned:
                        log.info("docker events from %s: connected again", self.socket_path)
                    warned = False
                    retry = EVENTS_RETRY_MIN
                    async for line in resp.content:
                        if line.strip():
                            self._dispatch(orjson.loads(line))
                raise EngineError("the Engine closed the events stream")
            except asyncio.CancelledError:
                raise
            except (EngineError, aiohttp.ClientError, orjson.JSONDecodeError, OSError) as exc:
                self.events_connected.clear()
                if not warned:
                    log.warning("docker events from %s: %s; retrying", self.socket_path, exc or type(exc).__name__)
                    warned = True
            await asyncio.sleep(retry)
            retry = min(retry * 2, EVENTS_RETRY_MAX)

    def _dispatch(self, event: dict) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("docker event listener failed on %s", event.get("Action"))


class DockerBackend:
    """One service's container(s) on one Engine: start, pause, unpause, stop, as ``Service`` asks."""

    def __init__(self, name: str, cfg, *, mode: str, host: str, port: int, ready_path: str,
                 ready_timeout: float) -> None:
        self.name = name
        self.cfg = cfg  # config.DockerConfig
        self.mode = mode  # "pause" or "stop"
        self.keeps_connections = mode == "pause"  # a paused container keeps its sockets
        self.host = host
        self.port = port
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.pools: list = []
        self.started_elsewhere: Callable[[], None] | None = None  # set by Service
        self.last_resume_seconds: float | None = None  # the Engine calls (start or unpause)
        self.last_ready_seconds: float | None = None
        self.last_error: str | None = None
        self.containers: dict[str, str] = {}  # id -> name of what the last wake ran
        self.awake = False  # between a wake and the next sleep or stop
        self._exited: asyncio.Future | None = None
        self._awake_since_ns = 0  # a death older than this is of an earlier wake
        self._asleep_since_ns = 0  # a start older than this is wakegate's own
        self._engine: DockerEngine | None = None
        self._stop = SharedStop()
        self._known_paused: set[str] | None = None  # paused by our last sleep, and nothing since

    # ---- the Engine ----

    def engine(self) -> DockerEngine:
        if self._engine is None:
            self._engine = DockerEngine.acquire(self.cfg.socket, self.cfg.api_timeout)
            self._engine.listen(self._on_event)
        return self._engine

    async def find(self) -> list[dict]:
        """The service's containers now: [{"Id", "Name", "State"}], State as the Engine says it
        (running, paused, exited, created, ...). EngineError when there is none."""
        engine = self.engine()
        if self.cfg.container:
            info = await engine.call("GET", f"/containers/{quote(self.cfg.container)}/json", ok=(200,))
            return [{"Id": info["Id"], "Name": info["Name"].lstrip("/"), "State": info["State"]["Status"]}]
        labels = [f"{k}={v}" for k, v in self.cfg.labels]
        listed = await engine.call("GET", "/containers/json",
                                   params={"all": "1", "filters": orjson.dumps({"label": labels}).decode()}, ok=(200,))
        if not listed:
            raise EngineError(f"no container is labelled {', '.join(labels)}")
        return [{"Id": c["Id"], "Name": (c.get("Names") or ["/" + c["Id"][:12]])[0].lstrip("/"), "State": c["State"]}
                for c in listed]

    def _matches(self, event: dict) -> bool:
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        if self.cfg.container:
            wanted = self.cfg.container
            return attributes.get("name") == wanted or actor.get("ID", "").startswith(wanted)
        return all(attributes.get(k) == v for k, v in self.cfg.labels)

    def _on_event(self, event: dict) -> None:
        action = event.get("Action") or event.get("status") or ""
        if not self._matches(event):
            return
        when = int(event.get("timeNano") or 0)
        if when > self._asleep_since_ns:
            self._known_paused = None  # someone else acted on it: look before acting
        if action in DIED and self.awake and when >= self._awake_since_ns:
            exited = self._exited
            if exited is not None and not exited.done():
                log.warning("service %s: container %s: %s (outside wakegate)", self.name,
                            (event.get("Actor") or {}).get("Attributes", {}).get("name", "?"), action)
                exited.set_result(action)
        elif action in STARTED and not self.awake and when > self._asleep_since_ns:
            log.info("service %s: a container was started outside wakegate (%s): it counts as awake",
                     self.name, action)
            if self.started_elsewhere is not None:
                self.started_elsewhere()

    # ---- what Service asks ----

    def exited(self) -> asyncio.Future:
        """Resolves when a container of the running service dies (from the events stream)."""
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            if not self.awake:
                self._exited.set_result(None)
        return self._exited

    async def _each(self, action: str, ids, timeout: float | None = None) -> None:
        engine = self.engine()
        await asyncio.gather(*(engine.call("POST", f"/containers/{cid}/{action}", timeout=timeout) for cid in ids))

    async def wake(self, deadline: float) -> None:
        await self._stop.wait()
        started = time.monotonic()
        self._awake_since_ns = time.time_ns()
        self._exited = asyncio.get_running_loop().create_future()
        self.awake = True
        try:
            if not await self._resume_known():
                found = await self.find()
                self.containers = {c["Id"]: c["Name"] for c in found}
                paused = [c["Id"] for c in found if c["State"] == "paused"]
                stopped = [c["Id"] for c in found if c["State"] not in ("paused", "running", "restarting")]
                await asyncio.gather(self._each("unpause", paused), self._each("start", stopped))
                if self.cfg.port:
                    await self._find_upstream(found[0]["Id"])
        except EngineError as exc:
            self.last_error = str(exc)
            raise
        resumed = time.monotonic()
        self.last_resume_seconds = resumed - started
        await probe_until_ready(self.host, self.port, self.ready_path, deadline, self.exited(), ATTEMPT_FIRST)
        self.last_ready_seconds = time.monotonic() - resumed

    async def _find_upstream(self, cid: str) -> None:
        """Where the container's port is reachable now: itself on the host network, or the host port
        it is published on (which a start may change). The pool connects there from now on."""
        info = await self.engine().call("GET", f"/containers/{cid}/json", ok=(200,))
        port = self.cfg.port
        if (info.get("HostConfig") or {}).get("NetworkMode") == "host":
            host, published = "127.0.0.1", port
        else:
            bindings = ((info.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{port}/tcp") or []
            if not bindings:
                raise EngineError(f"container {info.get('Name', cid).lstrip('/')}: port {port}/tcp is not published "
                                  "and it is not on the host network; publish it or set upstream")
            host = bindings[0].get("HostIp") or "127.0.0.1"
            host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            published = int(bindings[0]["HostPort"])
        if (host, published) != (self.host, self.port):
            log.info("service %s: upstream is %s:%d", self.name, host, published)
        self.host, self.port = host, published
        for pool in self.pools:
            pool.host, pool.port = host, published

    async def _resume_known(self) -> bool:
        """The containers wakegate itself paused, unchanged since (no event about them): unpause them
        without asking the Engine first (one round trip less). False: look them up instead."""
        if self._known_paused is None or self._known_paused != set(self.containers):
            return False
        self._known_paused = None
        try:
            await self._each("unpause", list(self.containers))
            return True
        except EngineError:
            return False  # changed after all (removed, unpaused): the full path finds out

    async def sleep(self) -> None:
        ids = list(self.containers)
        self._known_paused = None
        self.awake = False
        self._asleep_since_ns = NEVER  # until our own calls are done, no start is someone else's
        try:
            if self.mode == "pause":
                await self._each("pause", ids)
                self._known_paused = set(ids)
            else:
                await self._stop_containers(ids)
        finally:
            self._asleep_since_ns = time.time_ns()

    async def _stop_containers(self, ids) -> None:
        """stop?t=N: SIGTERM, SIGKILL after stop_timeout; a paused container is unpaused first (a
        frozen process cannot act on SIGTERM)."""
        if not ids:
            return
        found = {c["Id"]: c["State"] for c in await self.find()}
        await self._each("unpause", [i for i in ids if found.get(i) == "paused"])
        t = int(self.cfg.stop_timeout + 0.999)
        await asyncio.gather(*(self.engine().call("POST", f"/containers/{cid}/stop", params={"t": str(t)},
                                                  timeout=t + self.cfg.api_timeout) for cid in ids))

    async def stop(self) -> None:
        """The containers stop (memory freed); concurrent callers wait for the same stop. An Engine
        that cannot be reached is logged, not waited on."""
        await self._stop.run(self._stop_all)

    async def _stop_all(self) -> None:
        ids = list(self.containers)
        self._known_paused = None
        self.awake = False
        self._asleep_since_ns = NEVER
        try:
            await self._stop_containers(ids)
        except EngineError as exc:
            log.warning("service %s: stopping its containers: %s", self.name, exc)
        finally:
            self._asleep_since_ns = time.time_ns()

    def prepare_next_wake(self) -> None:
        """Follow the events while asleep too: a container started by hand wakes the service."""
        self.engine()

    def snapshot_stats(self) -> None:
        return None

    def describe(self) -> dict:
        return {
            "pid": None,
            "docker": {
                "socket": self.cfg.socket,
                "upstream": f"{self.host}:{self.port}",
                "selector": self.cfg.describe(),
                "containers": sorted(self.containers.values()),
                "events": bool(self._engine and self._engine.events_connected.is_set()),
                "last_error": self.last_error,
            },
        }

    async def close(self) -> None:
        """Let go of the Engine (the events stream and the HTTP session end with the last user)."""
        if self._engine is not None:
            engine, self._engine = self._engine, None
            engine.unlisten(self._on_event)
            await engine.release()
