"""The control plane: one Service per configured service, and the tick that expires held requests.

The proxy reaches it only through ``Service.acquire()`` / ``Lease.release()``;
the admin API reads ``snapshot()`` and sends wake and sleep commands.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time

from proxy.board import local_board

from .backends import instance_name, reap_leftovers
from .service import READY, Backend, Service

log = logging.getLogger("wakegate.controller")

EXPIRE_TICK_MAX = 0.1  # how often held requests are checked against wake_timeout, at most
MIN_SLOTS = 1024  # board slots at start, or twice the configured services: room for discovery and reloads


def board_slots(config) -> int:
    return max(MIN_SLOTS, 2 * len(config.services))


# Which backend runs a service: the first row whose config table the service has. A new backend is
# one module with a ``from_config(svc, instance) -> Backend`` and one row here. Modules load lazily,
# so a host without QEMU or CRIU never imports what it cannot run.
BACKENDS: tuple[tuple[str, str], ...] = (
    ("microvm", "controller.microvm"),  # [services.NAME.microvm]
    ("criu", "controller.criu"),  # a command with sleep = "snapshot"
    ("docker", "controller.docker"),  # [services.NAME.docker]
    ("oci", "controller.oci"),  # [services.NAME.oci]
    ("command", "controller.backends"),  # a plain command: pause or stop
)


def make_backend(svc, instance: str = "default") -> Backend | None:
    """The backend a service config asks for, or None (always up: a plain proxied upstream)."""
    for key, module in BACKENDS:
        if getattr(svc, key):
            return importlib.import_module(module).from_config(svc, instance)
    return None


class Controller:
    def __init__(self, config, pools: dict, board=None, local_worker: int | None = 0) -> None:
        """pools: service name -> the proxy's UpstreamPool for it (one process: the proxy's own).
        board: the shared board (proxy/board.py); local_worker: this process's column on it when it
        proxies requests itself, None when separate worker processes do."""
        self.config = config
        listen = config.proxy.listen
        self.instance = instance_name(listen.host, listen.port)
        self.board = board if board is not None else local_board(board_slots(config))
        self.local_worker = local_worker
        self.free_slots = list(range(self.board.slots - 1, -1, -1))  # pop() takes the lowest
        self.services: dict[str, Service] = {}
        self.holding: set = set()  # this process's gates with held requests: all the expiry tick visits
        for name, svc in config.services.items():
            self.services[name] = self._service(svc, pools.get(name))
        timeouts = [s.wake_timeout for s in self.services.values()] or [1.0]
        self.tick = min(EXPIRE_TICK_MAX, min(timeouts) / 10)
        self._ticker: asyncio.TimerHandle | None = None

    def _service(self, svc, pool) -> Service:
        backend = make_backend(svc, self.instance)
        if backend is not None and pool is not None:
            backend.pools = [pool]
        if not self.free_slots:
            raise RuntimeError(f"no board slot left for service {svc.name} ({self.board.slots} in use): "
                               "restart wakegate to make room")
        service = Service(svc.name, backend, idle_timeout=svc.idle_timeout if backend is not None else None,
                          wake_timeout=svc.wake_timeout, max_queue=svc.max_queue,
                          pools=[pool] if pool is not None else [], board=self.board, slot=self.free_slots.pop(),
                          local_worker=self.local_worker)
        if service.gate is not None:
            service.gate.holding = self.holding
        return service

    def add_service(self, svc, pool) -> Service:
        """A service that appeared while running (discovery); asleep until its first request."""
        service = self.services[svc.name] = self._service(svc, pool)
        self.tick = min(self.tick, svc.wake_timeout / 10)
        if service.backend is not None:
            service.backend.prepare_next_wake()
        return service

    async def remove_service(self, name: str) -> None:
        """A service that went away: its held requests are refused and its backend let go, without
        acting on what is already gone."""
        service = self.services.pop(name, None)
        if service is not None:
            self.holding.discard(service.gate)
            await service.close(stop_backend=False, reason="the service went away (its containers were removed)")
            self.free_slots.append(service.slot)

    def reap_leftovers(self) -> int:
        """Kill what an earlier wakegate with this proxy listener left behind. Call it only once the
        listener is bound: then no live wakegate is this instance."""
        return reap_leftovers(self.instance)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ticker = loop.call_later(self.tick, self._expire)
        for service in self.services.values():
            if service.backend is not None:
                service.backend.prepare_next_wake()  # every service starts asleep

    def _expire(self) -> None:
        now = time.monotonic()
        for gate in list(self.holding):
            gate.expire(now)
            if not gate.queue:
                self.holding.discard(gate)
        self._ticker = asyncio.get_running_loop().call_later(self.tick, self._expire)

    def snapshot(self) -> list[dict]:
        out = []
        for name, s in self.services.items():
            backend = s.backend
            out.append(
                {
                    "name": name,
                    "state": s.state.value,
                    "mode": backend.mode if backend else None,
                    "in_flight": s.in_flight,
                    "tunnels": s.tunnels,
                    "queued": s.queued,
                    "wakes": s.wakes,
                    "sleeps": s.sleeps,
                    "failures": s.failures,
                    "last_wake_ms": None if s.last_wake_seconds is None else round(s.last_wake_seconds * 1e3, 3),
                    "last_resume_ms": None if not backend or backend.last_resume_seconds is None
                    else round(backend.last_resume_seconds * 1e3, 3),
                    "last_ready_ms": None if not backend or backend.last_ready_seconds is None
                    else round(backend.last_ready_seconds * 1e3, 3),
                    "idle_seconds": round(time.monotonic() - s.idle_since, 3) if s.state is READY and not s.in_flight else 0,
                    **(backend.describe() if backend else {"pid": None}),
                }
            )
        return out

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        await asyncio.gather(*(s.close() for s in self.services.values()), return_exceptions=True)
