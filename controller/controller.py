"""The control plane: one Service per configured service, each on a slot of the shared board.

The proxy processes reach it only through the board (admission) and ``ask(slot)`` (a wake);
the admin API reads ``snapshot()`` and sends wake and sleep commands; a reload or discovery
changes the set of services through ``reconcile()``, ``add_service()`` and ``remove_service()``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import time

from proxy.board import local_board
from proxy.seam import Refused

from .backends import instance_name, reap_leftovers
from .config import NoWake
from .service import READY, Backend, Service
from .workers import FleetPool

log = logging.getLogger("wakegate.controller")

RETIRE_POLL = 0.01  # how often a retiring service's in-flight count is looked at
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


def same_backend(a, b) -> bool:
    """Whether two configs of a service run the same backend: all but routing and limits are equal
    (a reload keeps such a service's process and state, and applies the rest to new requests)."""
    neutral = dict(hosts=(), paths=(), idle_timeout=0.0, wake_timeout=0.0, max_queue=0, no_wake=NoWake(),
                   wait_page=False, wait_page_after=0.0)
    return dataclasses.replace(a, **neutral) == dataclasses.replace(b, **neutral)


class Controller:
    """Every service's supervisor, each on its board slot; the data path reaches them only through
    ``ask(slot)`` and the board. ``fleet`` (controller/workers.py) is the way back to the proxy
    processes: wake answers, pool flushes."""

    def __init__(self, config, board=None) -> None:
        self.config = config
        listen = config.proxy.listen
        self.instance = instance_name(listen.host, listen.port)
        self.board = board if board is not None else local_board(board_slots(config))
        self.fleet = None  # set before the first wake: see attach()
        self.free_slots = list(range(self.board.slots - 1, -1, -1))  # pop() takes the lowest
        self.services: dict[str, Service] = {}
        self.configs: dict[str, object] = {}  # name -> the ServiceConfig it runs with
        self.by_slot: dict[int, Service] = {}  # every service with a slot, retiring ones too
        self.released: list[int] = []  # slots of services gone, free once every process has new routes
        self._retiring: set[asyncio.Task] = set()
        self.retiring: dict[str, asyncio.Task] = {}  # name -> the drain and stop of a service that went
        # Who hears of every service's state changes: callables (service, old, new), called by its
        # supervisor (the Kubernetes agent turns them into pod status). They must not block or raise.
        self.observers: list = []
        for name, svc in config.services.items():
            self._add(svc)

    def attach(self, fleet) -> None:
        """The proxy processes: answers to wakes and pool flushes go to them from now on."""
        self.fleet = fleet

    def slots(self) -> dict[str, int]:
        return {name: service.slot for name, service in self.services.items()}

    def _add(self, svc, after: asyncio.Future | None = None) -> Service:
        if not self.free_slots:
            raise RuntimeError(f"no board slot left for service {svc.name} ({self.board.slots} in use): "
                               "restart wakegate to make room")
        slot = self.free_slots.pop()
        backend = make_backend(svc, self.instance)
        service = Service(svc.name, backend, idle_timeout=svc.idle_timeout if backend is not None else None,
                          wake_timeout=svc.wake_timeout, max_queue=svc.max_queue, board=self.board, slot=slot,
                          local_worker=None, on_state=self._observe)
        pool = FleetPool(svc.upstream.host, svc.upstream.port, self, slot)
        service.pools = [pool]
        if backend is not None:
            backend.pools = [pool]
        service.listeners.append(self._answer)
        service.wake_after = after
        self.services[svc.name] = service
        self.configs[svc.name] = svc
        self.by_slot[slot] = service
        return service

    def _observe(self, service: Service, old, new) -> None:
        for observer in list(self.observers):
            observer(service, old, new)

    # ---- what FleetPool and the services call: passed on to the proxy processes ----

    def _answer(self, service: Service, refused) -> None:
        if self.fleet is not None:
            self.fleet.answer(service.slot, refused)

    def flush(self, slot: int) -> None:
        if self.fleet is not None:
            self.fleet.flush(slot)

    async def flush_wait(self, slot: int) -> None:
        if self.fleet is not None:
            await self.fleet.flush_wait(slot)

    def upstream(self, slot: int, host: str, port: int) -> None:
        if self.fleet is not None:
            self.fleet.upstream(slot, host, port)

    def ask(self, slot: int) -> None:
        """A proxy process holds requests for the service in this slot."""
        service = self.by_slot.get(slot)
        if service is not None:
            service.ask()
        elif self.fleet is not None:  # its slot was given back: the gate is gone with its config
            self.fleet.answer(slot, Refused(503, "the service was removed", 1.0))

    # ---- services coming and going (reloads, discovery) ----

    def reconcile(self, config) -> list[str]:
        """Make the services those of config: new ones added (asleep), removed ones retired (drained,
        then stopped, in the background), changed limits applied in place, and a service whose
        backend changed replaced by a new one that wakes only after the old one is gone. Call
        fleet.reload with slots() afterwards. Returns what changed, one line per service."""
        changes = []
        for name, svc in config.services.items():
            old = self.services.get(name)
            if old is None:
                added = self._add(svc)
                if added.backend is not None:
                    added.backend.prepare_next_wake()
                changes.append(f"{name}: added")
            elif same_backend(self.configs[name], svc):
                if self.configs[name] != svc:
                    old.idle_timeout = svc.idle_timeout if old.backend is not None else None
                    old.wake_timeout, old.max_queue = svc.wake_timeout, svc.max_queue
                    self.configs[name] = svc
                    changes.append(f"{name}: routes or limits changed")
            else:
                retired = self._retire(name, "its backend changed")
                added = self._add(svc, after=retired)
                if added.backend is not None:
                    added.backend.prepare_next_wake()
                changes.append(f"{name}: backend changed; the old one is drained and stopped first")
        for name in [n for n in self.services if n not in config.services]:
            self._retire(name, "removed from the config")
            changes.append(f"{name}: removed; drained, then stopped")
        self.config = config
        self._kick_ticks()
        return changes

    def _retire(self, name: str, why: str) -> asyncio.Task:
        service = self.services.pop(name)
        self.configs.pop(name)
        task = asyncio.get_running_loop().create_task(self._drain_and_close(service, why), name=f"retire-{name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        self.retiring[name] = task
        task.add_done_callback(lambda t: self.retiring.get(name) is t and self.retiring.pop(name))
        return task

    async def gone(self, name: str) -> None:
        """Wait until a service removed by the last reconcile has drained and its backend stopped."""
        task = self.retiring.get(name)
        if task is not None:
            await asyncio.shield(task)

    async def _drain_and_close(self, service: Service, why: str) -> None:
        deadline = time.monotonic() + self.config.proxy.drain_timeout
        while (service.in_flight or service.queued) and time.monotonic() < deadline:
            await asyncio.sleep(RETIRE_POLL)
        if service.in_flight:
            log.warning("service %s: %d requests still in flight after the drain; stopping it", service.name,
                        service.in_flight)
        await service.close(reason=f"the service was {why}")
        self.by_slot.pop(service.slot, None)
        self._release(service)
        log.info("service %s: %s; stopped", service.name, why)

    def _release(self, service: Service) -> None:
        if service.in_flight:  # late releases would land on the slot's next service: never reuse it
            log.warning("service %s: board slot %d is not reused until a restart", service.name, service.slot)
            return
        self.released.append(service.slot)

    def settle(self) -> None:
        """Every proxy process has the routes of the last reconcile: slots released before are free."""
        self.free_slots.extend(self.released)
        self.released.clear()

    async def remove_service(self, name: str, why: str = "the service went away (its containers were removed)") -> None:
        """A service that went away: its held requests are refused and its backend let go, without
        acting on what is already gone."""
        service = self.services.pop(name, None)
        if service is not None:
            self.configs.pop(name, None)
            await service.close(stop_backend=False, reason=why)
            self.by_slot.pop(service.slot, None)
            self._release(service)

    def _kick_ticks(self) -> None:
        for service in self.services.values():
            if service.backend is not None and service.state is READY:
                service.request_idle_check()

    def reap_leftovers(self) -> int:
        """Kill what an earlier wakegate with this proxy listener left behind. Call it only once the
        listener is bound: then no live wakegate is this instance."""
        return reap_leftovers(self.instance)

    def start(self) -> None:
        for service in self.services.values():
            if service.backend is not None:
                service.backend.prepare_next_wake()  # every service starts asleep

    def snapshot(self) -> list[dict]:
        out = []
        for name, s in self.services.items():
            backend = s.backend
            out.append(
                {
                    "name": name,
                    "state": s.state.value,
                    "mode": backend.mode if backend else ("wasm" if self.configs[name].wasm else None),
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
                    "workers": [{"worker": w, "in_flight": self.board.column(s.slot, w)[0],
                                 "queued": self.board.column(s.slot, w)[2]} for w in range(self.board.workers)],
                    **(backend.describe() if backend else {"pid": None}),
                    **({"wasm": {"module": self.configs[name].wasm.module, "instances": self.configs[name].wasm.instances}}
                       if self.configs[name].wasm else {}),
                }
            )
        return out

    async def close(self) -> None:
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in self.services.values()), return_exceptions=True)
