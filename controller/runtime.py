"""``wakegate serve`` as one object: the controller, the proxy processes (controller/workers.py), the
admin API and the metrics, started in order, reloaded in place, and stopped so nothing is left.

A reload (SIGHUP or ``POST /reload``) reads the config file again. A config that fails validation
changes nothing and is reported with its file and key, as ``nginx -s reload`` does. Otherwise the
services are reconciled (Controller.reconcile) and every proxy process gets the new routes; the
listen addresses and the worker count need a restart and are kept until then (logged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
import sys

from proxy.board import SharedBoard, local_board
from proxy.metrics import ProxyStats, ServiceStats

from .config import ConfigError, load
from .controller import Controller, board_slots
from .workers import InProcess, Workers, activated_sockets, bind_listener

log = logging.getLogger("wakegate")

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _name(sock) -> str:
    address = sock.getsockname()
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


class _Merged:
    """What the metrics exposition reads of a route: its counters, summed over every worker."""

    __slots__ = ("stats",)

    def __init__(self) -> None:
        self.stats = ServiceStats()


class Runtime:
    def __init__(self, config, log_level: str = "info") -> None:
        self.config = config  # what runs: the file's services and discovered ones
        self.file_config = config  # the config file as last loaded
        self.log_level = log_level
        self.controller: Controller | None = None
        self.fleet = None
        self.shared: SharedBoard | None = None
        self.admin = None
        self.exposition = None
        self.admin_stats = ProxyStats()  # the admin listener's own errors
        self.routes: dict[str, _Merged] = {}  # the exposition's view: merged per scrape
        self.proxy_stats = ProxyStats()
        self.discovery = None
        self.kube = None  # controller/kube: this host as a Kubernetes node, its pods as services
        self.reloads = 0
        self.listeners: dict[str, object] = {}  # services' own listening sockets, by address
        self._reloading = asyncio.Lock()
        self._stop = asyncio.Event()

    # ---- start, run, stop ----

    async def run(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        workers = config.proxy.workers
        slots = board_slots(config)
        if workers > 1:
            self.shared = SharedBoard(slots, workers)
            board = self.shared.board
        else:
            board = local_board(slots)
        try:
            self.controller = controller = Controller(config, board)
        except RuntimeError as exc:  # a backend that cannot run here (no CRIU, ...)
            print(f"wakegate: {config.path}: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
        for sig in (signal.SIGTERM, signal.SIGINT):  # before listening: a signal must never find us unprepared
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_soon)
        try:
            activated = activated_sockets()
        except (ValueError, OSError) as exc:
            print(f"wakegate: socket activation: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        unknown = set(activated) - {"proxy", "admin", "https"}
        if unknown:
            print(f"wakegate: socket activation passed sockets named {', '.join(sorted(unknown))}; expected "
                  "FileDescriptorName=proxy, admin and https", file=sys.stderr)
            return EXIT_CONFIG
        sock = activated.get("proxy")
        if sock is not None:
            log.info("proxy listener handed over by systemd: %s (proxy.listen is not used)", _name(sock))
        else:
            try:
                sock = bind_listener(config.proxy.listen)
            except OSError as exc:
                print(f"wakegate: {config.path}: proxy.listen: cannot listen on {config.proxy.listen}: "
                      f"{exc.strerror or exc}", file=sys.stderr)
                return EXIT_CONFIG
        tls_sock = activated.get("https")
        if tls_sock is None and config.tls.listen is not None:
            try:
                tls_sock = bind_listener(config.tls.listen)
            except OSError as exc:
                sock.close()
                print(f"wakegate: {config.path}: tls.listen: cannot listen on {config.tls.listen}: "
                      f"{exc.strerror or exc}", file=sys.stderr)
                return EXIT_CONFIG
        if tls_sock is not None and not config.tls.certificates:
            print(f"wakegate: {config.path}: tls: an HTTPS socket was handed over but there is no "
                  "[[tls.certificates]]", file=sys.stderr)
            return EXIT_CONFIG
        self.listening = _name(sock) + (f" and https://{_name(tls_sock)}" if tls_sock is not None else "")
        if workers > 1:
            self.fleet = Workers(workers, config, self.shared, controller.slots(), controller.ask, self.log_level)
        else:
            self.fleet = InProcess(config, board, controller.slots(), controller.ask)
        problem = self.open_listeners(config)
        if problem:
            for s in (sock, tls_sock):
                s is not None and s.close()
            print(f"wakegate: {config.path}: {problem}", file=sys.stderr)
            return EXIT_CONFIG
        controller.attach(self.fleet)
        try:
            await self.fleet.start(sock, tls_sock)
        except OSError as exc:  # the access log cannot be opened
            sock.close()
            print(f"wakegate: {config.path}: log.access: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
        controller.reap_leftovers()  # the listener is ours: no live wakegate is this instance
        if config.metrics.enabled:
            from .metrics import FastExposition

            self.exposition = FastExposition(controller, self.routes, self.proxy_stats)
        from .admin import start_admin

        try:
            self.admin = await start_admin(controller, config.admin, self.exposition, self.admin_stats, runtime=self,
                                           sock=activated.get("admin"))
        except OSError as exc:
            print(f"wakegate: {config.path}: admin.listen: cannot listen on {config.admin.listen}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            await self.fleet.drain(0)
            return EXIT_CONFIG
        controller.start()
        if config.discovery.enabled:
            from .discovery import Discovery, LiveServices

            self.discovery = Discovery(LiveServices(self), config.discovery.socket)
            await self.discovery.start()
        from . import __version__

        if config.kubernetes.enabled:
            from .kube.agent import KubeNode

            self.kube = KubeNode(self, config.kubernetes, __version__)
            try:
                await self.kube.start()
            except Exception as exc:  # credentials lightkube cannot use (an auth plugin it lacks, a bad file)
                print(f"wakegate: {config.path}: kubernetes: cannot use the credentials: {exc}", file=sys.stderr)
                await self.kube.close()
                self.kube = None
                await self._shutdown()
                return EXIT_RUNTIME
        # Everything built so far (config, services) lives as long as the process: keep it out of the
        # garbage collector's full passes, which otherwise walk ~20 objects per configured service.
        gc.collect()
        gc.freeze()
        from .cli import _implementation

        log.info("wakegate %s listening on %s (admin %s), %d services, %d proxy %s, parser: %s", __version__,
                 self.listening, config.admin.listen if "admin" not in activated else _name(activated["admin"]),
                 len(config.services), workers,
                 "process" if workers == 1 else "worker processes", _implementation())
        await self._stop.wait()
        return await self._shutdown()

    async def _shutdown(self) -> int:
        grace = self.config.proxy.drain_timeout
        if self.kube is not None:
            await self.kube.stop_serving()  # the node NotReady, its pods not ready: clients move away first
        log.info("draining: no new connections; in-flight requests get %.1fs", grace)
        cut = await self.fleet.drain(grace)
        if cut:
            log.warning("drain: %d connections were still busy at the end of the grace period", cut)
        for key in list(self.listeners):
            self.listeners.pop(key).close()
        if self.discovery is not None:
            await self.discovery.close()
        if self.kube is not None:
            await self.kube.close()
        await self.controller.close()  # stops every backend process: nothing is left behind
        await self.admin.close()
        if self.shared is not None:
            self.shared.close()
        log.info("stopped")
        return 0

    # ---- services' own listeners ----

    def open_listener(self, address) -> None:
        """Bind a service's own listener (kept open across reloads while a service has it) and hand
        it to the proxy processes; OSError when the address cannot be had."""
        key = str(address)
        if key in self.listeners:
            return
        sock = bind_listener(address)
        self.listeners[key] = sock
        self.fleet.listen(key, sock)

    def open_listeners(self, config) -> str | None:
        """Every listener config's services name, opened; what went wrong, naming the service's key."""
        for name, svc in config.services.items():
            for address in svc.listen:
                try:
                    self.open_listener(address)
                except OSError as exc:
                    return f"services.{name}.listen: cannot listen on {address}: {exc.strerror or exc}"
        return None

    def close_listeners(self, config) -> None:
        """Let go of the listeners no service of config has (the proxy processes already did)."""
        wanted = {str(a) for svc in config.services.values() for a in svc.listen}
        for key in [k for k in self.listeners if k not in wanted]:
            self.fleet.unlisten(key)
            self.listeners.pop(key).close()

    # ---- metrics over every worker ----

    async def refresh_stats(self) -> None:
        """Sum every worker's counters into the exposition's view (at scrape time only)."""
        exports = await self.fleet.stats()
        routes: dict[str, _Merged] = {}
        proxy = ProxyStats()
        proxy.absorb(self.admin_stats.export())
        for export in exports:
            proxy.absorb(export["proxy"])
            for name, stats in export["services"].items():
                merged = routes.get(name)
                if merged is None:
                    merged = routes[name] = _Merged()
                merged.stats.absorb(stats)
        self.routes.clear()
        self.routes.update(routes)
        for field in ("client_errors", "accept_errors"):
            setattr(self.proxy_stats, field, getattr(proxy, field))
        self.proxy_stats.access_dropped = proxy.access_dropped

    def workers(self) -> list[dict]:
        return self.fleet.describe()

    # ---- reload ----

    def _reload_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def reload(self) -> dict:
        """Read the config file again and apply it; {"ok": bool, "error" or "changes": ...}."""
        async with self._reloading:
            try:
                new = load(self.config.path)
            except ConfigError as exc:
                log.error("reload: %s; keeping the running config", exc)
                return {"ok": False, "error": str(exc)}
            return await self._apply(new, "reload")

    async def rediscover(self, why: str = "discovery") -> dict:
        """Discovered services (Docker labels, Kubernetes pods) changed: apply them with the config file's."""
        async with self._reloading:
            return await self._apply(self.file_config, why)

    def routed(self) -> dict[tuple[str, str], str]:
        """(host, path prefix) -> the running service that claims it."""
        claims = {}
        for svc in self.config.services.values():
            for host in svc.hosts:
                for prefix in svc.paths or ("",):
                    claims[(host, prefix)] = svc.name
        return claims

    async def forget(self, name: str) -> None:
        """A discovered service whose containers are gone: let go of it without stopping anything."""
        async with self._reloading:
            await self.controller.remove_service(name)
            services = {n: s for n, s in self.config.services.items() if n != name}
            self.config = dataclasses.replace(self.config, services=services)
            await self.fleet.reload(self.config, self.controller.slots())
            self.controller.settle()
            self.close_listeners(self.config)

    async def _apply(self, new, why: str) -> dict:
        """Make a validated config the running one (a reload, or discovery's services changing)."""
        file_config = new
        old = self.config
        kept = []
        for key in ("listen", "workers"):
            if getattr(new.proxy, key) != getattr(old.proxy, key):
                kept.append(f"proxy.{key}")
        if new.tls.listen != old.tls.listen:
            kept.append("tls.listen")
            new = dataclasses.replace(new, tls=dataclasses.replace(new.tls, listen=old.tls.listen))
        if new.admin != old.admin:
            kept.append("admin")
        if new.log.access != old.log.access:
            kept.append("log.access")
        if new.kubernetes != old.kubernetes:
            kept.append("kubernetes")
            new = dataclasses.replace(new, kubernetes=old.kubernetes)
        if kept:
            log.warning("%s: %s changed; that takes a restart (keeping the running values)", why, ", ".join(kept))
            new = dataclasses.replace(new, proxy=dataclasses.replace(new.proxy, listen=old.proxy.listen,
                                                                     workers=old.proxy.workers),
                                      admin=old.admin, log=dataclasses.replace(new.log, access=old.log.access))
        if self.discovery is not None:
            discovered = {n: s for n, s in self.discovery.live.discovered.items() if n not in new.services}
            new = dataclasses.replace(new, services={**discovered, **new.services})
        if self.kube is not None:
            pods = {n: s for n, s in self.kube.services.items() if n not in new.services}
            new = dataclasses.replace(new, services={**pods, **new.services})
        problem = self.open_listeners(new)
        if problem:
            log.error("%s: %s; keeping the running config", why, problem)
            self.close_listeners(self.config)  # those just opened for it
            return {"ok": False, "error": f"{new.path}: {problem}"}
        try:
            changes = self.controller.reconcile(new)
        except RuntimeError as exc:  # out of board slots
            log.error("%s: %s; keeping the running config", why, exc)
            self.close_listeners(self.config)
            return {"ok": False, "error": str(exc)}
        self.config, self.file_config = new, file_config
        await self.fleet.reload(new, self.controller.slots())
        self.controller.settle()
        self.close_listeners(new)
        self.reloads += 1
        for line in changes:
            log.info("%s: service %s", why, line)
        log.info("%s: done (%d services, %d changes)", why, len(new.services), len(changes))
        return {"ok": True, "changes": changes, "kept": kept}

    def stop(self) -> None:
        self._stop.set()
