"""The data path of one process: the router, each service's upstream pool, gate and counters, the
client listener and the access log, built from a validated config and rebuilt on a reload without
dropping a connection or a held request. ``python -m proxy.worker`` runs one in a proxy worker
process under a controller (controller/workers.py), which it talks to over one Unix socket.

Messages on that socket are length-prefixed pickles (both ends are wakegate, started together):
worker -> controller ``ask`` (a gate holds requests: wake the service in that board slot),
``ready``, ``stats``; controller -> worker ``start``, ``answer`` (a wake's outcome), ``flush``
(the service's process went away: drop its idle upstream connections), ``stats`` (a scrape),
``config`` (a reload). A request for a READY service sends nothing: the board admits it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time

from .gate import Gate
from .seam import Refused

log = logging.getLogger("wakegate.worker")

EXPIRE_TICK_MAX = 0.1  # how often held requests are checked against wake_timeout, at most
CONTROLLER_GONE_GRACE = 1.0  # in-flight requests get this long when the controller dies
FRAME = struct.Struct(">I")
MAX_MESSAGE = 64 * 1024 * 1024  # a scrape of thousands of services is a few MB; more is a bug


class Channel:
    """Length-prefixed pickles over an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def over(cls, sock: socket.socket) -> "Channel":
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_MESSAGE)
        return cls(reader, writer)

    def send(self, message: dict) -> None:
        if self.writer.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(FRAME.pack(len(data)) + data)

    async def receive(self) -> dict | None:
        """The next message, or None at the end of the stream."""
        try:
            head = await self.reader.readexactly(FRAME.size)
            (size,) = FRAME.unpack(head)
            if size > MAX_MESSAGE:
                raise ValueError(f"message of {size} bytes")
            return pickle.loads(await self.reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def connection_share(limit: int, workers: int, worker: int) -> int:
    """This worker's part of upstream_max_connections, which bounds the whole front door (as
    HAProxy's per-server maxconn does; nginx's max_conns is per worker unless in a shared zone):
    the limit split evenly, the remainder to the first workers, at least one each. 0: no limit."""
    if not limit:
        return 0
    return max(1, limit // workers + (1 if worker < limit % workers else 0))


def _pool_key(config, svc, limit: int) -> tuple:
    return (svc.upstream.host, svc.upstream.port, config.proxy.upstream_keepalive, limit)


class DataPath:
    """One process's proxy: routes built from a config, gates on the board, the listener.

    ``ask(slot)`` is how a gate reaches the controller (a message, or a call in one process);
    ``answer(slot, refused)`` and ``flush(slot)`` are the controller's way back.
    """

    def __init__(self, config, board, worker: int, slots: dict[str, int], ask, loop=None) -> None:
        from .server import ProxyServer

        self.loop = loop or asyncio.get_running_loop()
        self.board = board
        self.worker = worker
        self.ask = ask
        self.config = config
        self.routes: dict = {}
        self.gates: dict[int, Gate] = {}  # slot -> gate
        self.holding: set[Gate] = set()  # gates with held requests: all the expiry tick visits
        self.wasm = None  # proxy/wasm.py's WasmServer, when the config has wasm services
        self.certificates = None  # proxy/tls.py's Certificates, with an HTTPS listener
        self._tls_check = None
        # Services' own listeners (``listen``, a pod's port): the sockets the controller handed over,
        # and the members each address routes to. A listener is served once it has both.
        self.listeners: dict[str, socket.socket] = {}
        self.port_routers: dict = {}  # address -> PortRouter
        self.started = False
        self.server = ProxyServer(config.proxy, None, self.loop)
        self._apply(config, slots)
        self.server.server_timing = config.log.server_timing
        self.server.measure = config.metrics.enabled
        self._ticker = None

    # ---- building and rebuilding the routes ----

    def _apply(self, config, slots: dict[str, int]) -> None:
        from controller.cli import build_router

        old_routes, old_gates = self.routes, self.gates
        router, routes = build_router(config)
        gates: dict[int, Gate] = {}
        limit = connection_share(config.proxy.upstream_max_connections, self.board.workers, self.worker)
        for name, route in routes.items():
            svc = config.services[name]
            old = old_routes.get(name)
            key = _pool_key(config, svc, limit)
            if old is not None and old.pool_key == key:
                route.pool = old.pool  # same upstream: its warm connections stay
            else:
                route.pool.max_connections = limit
            route.pool_key = key
            if old is not None:
                route.stats = old.stats  # counters go on
            slot = slots[name]
            gate = old_gates.get(slot)
            if gate is None or gate.name != name:
                gate = Gate(name, self.board, slot, self.worker, max_queue=svc.max_queue,
                            wake_timeout=svc.wake_timeout, ask=self._ask)
                gate.holding = self.holding
            gate.max_queue, gate.wake_timeout = svc.max_queue, svc.wake_timeout
            gates[slot] = gate
            route.service = gate
        for name, old in old_routes.items():
            route = routes.get(name)
            if route is None or route.pool is not old.pool:
                old.pool.close_idle()  # requests in flight finish on their own connections
        for slot, gate in old_gates.items():
            if gates.get(slot) is not gate:
                self.holding.discard(gate)
                gate.close("the service was removed from the config")
        self.routes, self.gates, self.config = routes, gates, config
        self._apply_wasm(config)
        self.server.router = router
        self._apply_ports(config, routes)
        self.tick = min([EXPIRE_TICK_MAX] + [s.wake_timeout / 10 for s in config.services.values()])

    def _apply_ports(self, config, routes: dict) -> None:
        """Point every service's own listener at its members now; stop serving addresses no service
        has any more (their connections finish on their own) and let go of their sockets."""
        from .routing import PortRouter

        wanted: dict[str, list] = {}
        for name, svc in config.services.items():
            for address in svc.listen:
                wanted.setdefault(str(address), []).append(routes[name])
        for key, members in wanted.items():
            router = self.port_routers.get(key)
            if router is None:
                router = self.port_routers[key] = PortRouter()
            router.members[:] = members  # in place: open connections see the change
        for key in [k for k in self.port_routers if k not in wanted]:
            self.port_routers.pop(key).members.clear()
            self.server.stop_port(key)
            sock = self.listeners.pop(key, None)
            if sock is not None:
                sock.close()  # a no-op once served: closing the server closed it

    def give_listener(self, key: str, sock: socket.socket) -> None:
        """The controller hands over a service's own listening socket (a duplicate of its own)."""
        old = self.listeners.get(key)
        if old is not None and old is not sock:
            sock.close()  # already have it
            return
        self.listeners[key] = sock

    def drop_listener(self, key: str) -> None:
        """The controller let go of a listener no service routes: close ours unless a service has it."""
        if key not in self.port_routers:
            sock = self.listeners.pop(key, None)
            if sock is not None:
                sock.close()

    async def serve_ports(self) -> None:
        """Start accepting on every own listener that has both its socket and its members."""
        if not self.started:
            return
        for key, router in self.port_routers.items():
            sock = self.listeners.get(key)
            if sock is not None and key not in self.server.port_servers:
                sock.setblocking(False)
                await self.server.start_port(key, sock, router)

    def _apply_wasm(self, config) -> None:
        """Wasm services are answered by this process's own handler listener: point their routes at it."""
        if self.wasm is None:
            if not any(svc.wasm is not None for svc in config.services.values()):
                return
            from .wasm import WasmServer

            self.wasm = WasmServer(self.loop)
        from .metrics import WasmStats

        self.wasm.configure(config)
        for name, service in self.wasm.services.items():
            route = self.routes[name]
            if route.stats.wasm is None:
                route.stats.wasm = WasmStats()
            service.stats = route.stats.wasm
            if self.wasm.port:
                route.pool.host, route.pool.port = "127.0.0.1", self.wasm.port

    async def reload(self, config, slots: dict[str, int]) -> None:
        """A new config: new and changed routes take new requests; connections and held requests stay."""
        from .server import Limits

        self._apply(config, slots)
        await self.serve_ports()
        if self.wasm is not None and self.wasm.server is None and self.server.server is not None:
            await self.wasm.start()  # the first wasm service came with this reload
            self._apply_wasm(config)
        self.server.settings = config.proxy
        self.server.limits = Limits(config.proxy)  # new connections read it; open ones keep theirs
        self.server.server_timing = config.log.server_timing
        self.server.measure = config.metrics.enabled
        if self.certificates is not None and config.tls.certificates != self.certificates.entries:
            import ssl

            try:
                self.certificates.update(config.tls.certificates)
            except (OSError, ssl.SSLError) as exc:
                log.error("reload: certificates not changed: %s", exc)

    def _ask(self, gate: Gate) -> None:
        self.ask(gate.slot)

    # ---- the controller's way back ----

    def answer(self, slot: int, refused: Refused | None) -> None:
        gate = self.gates.get(slot)
        if gate is not None:
            gate.answer(refused)

    def flush(self, slot: int) -> None:
        gate = self.gates.get(slot)
        if gate is not None:
            route = self.routes.get(gate.name)
            if route is not None:
                route.pool.close_idle()

    def move(self, slot: int, host: str, port: int) -> None:
        """The service answers at another address now (a container's published port)."""
        gate = self.gates.get(slot)
        route = self.routes.get(gate.name) if gate is not None else None
        if route is not None and (route.pool.host, route.pool.port) != (host, port):
            route.pool.close_idle()
            route.pool.host, route.pool.port = host, port

    def stats(self) -> dict:
        return {"services": {name: route.stats.export() for name, route in self.routes.items()},
                "proxy": self.server.stats.export(), "connections": len(self.server.connections)}

    # ---- life ----

    async def start(self, sock: socket.socket | None = None, tls_sock: socket.socket | None = None) -> None:
        """Listen (on sock when given: a listener shared by every worker; HTTPS on tls_sock) and start
        the ticks."""
        if self.config.log.access:
            from .metrics import AccessLog

            self.server.access_log = AccessLog(self.config.log.access, self.loop, self.server.stats)
        try:
            if self.wasm is not None:
                await self.wasm.start()
                self._apply_wasm(self.config)
            await self.server.start(sock)
            if tls_sock is not None:
                from .tls import RELOAD_CHECK_SECONDS, Certificates

                self.certificates = Certificates(self.config.tls.certificates)
                await self.server.start_tls(tls_sock, self.certificates.context)
                self._tls_check = self.loop.call_later(RELOAD_CHECK_SECONDS, self._check_certificates)
        except BaseException:
            self._close_access_log()
            if self.wasm is not None:
                self.wasm.close()
            raise
        self.started = True
        await self.serve_ports()
        self._ticker = self.loop.call_later(self.tick, self._expire)

    def _check_certificates(self) -> None:
        from .tls import RELOAD_CHECK_SECONDS

        self.certificates.reload_if_changed()
        self._tls_check = self.loop.call_later(RELOAD_CHECK_SECONDS, self._check_certificates)

    def _expire(self) -> None:
        now = time.monotonic()
        for gate in list(self.holding):
            gate.expire(now)
            if not gate.queue:
                self.holding.discard(gate)
        self._ticker = self.loop.call_later(self.tick, self._expire)

    async def drain(self, grace: float) -> int:
        """Stop accepting, let in-flight requests finish within grace, refuse held ones; return
        the connections cut off."""
        for gate in self.gates.values():
            gate.closing = "wakegate is shutting down"
        cut = await self.server.drain(grace)
        for sock in self.listeners.values():
            sock.close()  # a no-op for those being served: the drain closed them
        self.listeners.clear()
        for gate in self.gates.values():
            gate.close("wakegate is shutting down")
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._tls_check is not None:
            self._tls_check.cancel()
            self._tls_check = None
        for route in self.routes.values():
            route.pool.close_idle()
        if self.wasm is not None:
            self.wasm.close()
        self._close_access_log()
        return cut

    def _close_access_log(self) -> None:
        if self.server.access_log is not None:
            self.server.access_log.close()
            self.server.access_log = None


# ---- the worker process ------------------------------------------------------------------

MAX_LISTENER_NAME = 512  # an address as text ("[v6]:port"): far below this


def take_listeners(channel: socket.socket, path: DataPath) -> None:
    """Read the listening sockets the controller handed over, or lets go of (one per message:
    controller/workers.py hand_over), and serve them."""
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(channel, MAX_LISTENER_NAME, 1)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            log.error("worker: reading handed-over listeners: %s", exc)
            path.loop.remove_reader(channel.fileno())
            return
        if not data and not fds:  # the controller is gone; the control channel says so too
            path.loop.remove_reader(channel.fileno())
            return
        key = data[1:].decode()
        for fd in fds:
            path.give_listener(key, socket.socket(fileno=fd))
        if data[:1] == b"-":
            path.drop_listener(key)
    path.loop.create_task(path.serve_ports())


async def run_worker(control_fd: int, listen_fd: int, board_fd: int, tls_fd: int = -1, fds_fd: int = -1) -> int:
    from .board import attach

    loop = asyncio.get_running_loop()
    channel = await Channel.over(socket.socket(fileno=control_fd))
    start = await channel.receive()
    if start is None:
        return 0  # the controller went away before we started
    board, mapping = attach(board_fd, start["board_slots"], start["board_workers"])
    listener = socket.socket(fileno=listen_fd)
    config = start["config"]
    path = DataPath(config, board, start["worker"], start["slots"], lambda slot: channel.send({"op": "ask", "slot": slot}))
    handed = None
    if fds_fd >= 0:
        handed = socket.socket(fileno=fds_fd)
        handed.setblocking(False)
        loop.add_reader(fds_fd, take_listeners, handed, path)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the controller's: it tells us the new config
    await path.start(listener, socket.socket(fileno=tls_fd) if tls_fd >= 0 else None)
    # What is built now (config, routes, gates) lives as long as the process: out of the collector's
    # full passes, as the controller does with its own.
    gc.collect()
    gc.freeze()
    channel.send({"op": "ready", "pid": os.getpid()})
    receiving = loop.create_task(_serve_controller(channel, path))
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    controller_gone = receiving.done()
    receiving.cancel()
    stopping.cancel()
    grace = CONTROLLER_GONE_GRACE if controller_gone else config.proxy.drain_timeout
    if controller_gone:
        log.warning("worker %d: the controller is gone; exiting", start["worker"])
    cut = await path.drain(min(grace, path.config.proxy.drain_timeout))
    if cut:
        log.warning("worker %d: %d connections were still busy at the end of the grace period", start["worker"], cut)
    channel.send({"op": "drained", "cut": cut})
    await channel.close()
    if handed is not None:
        loop.remove_reader(fds_fd)
        handed.close()
    del board
    return 0


async def _serve_controller(channel: Channel, path: DataPath) -> None:
    while True:
        message = await channel.receive()
        if message is None:
            return
        op = message["op"]
        if op == "answer":
            refused = message.get("refused")
            path.answer(message["slot"], None if refused is None else Refused(*refused))
        elif op == "stats":
            channel.send({"op": "stats", "id": message["id"], "stats": path.stats()})
        elif op == "flush":
            path.flush(message["slot"])
            if "id" in message:
                channel.send({"op": "flushed", "id": message["id"]})
        elif op == "upstream":
            path.move(message["slot"], message["host"], message["port"])
        elif op == "config":
            await path.reload(message["config"], message["slots"])
            channel.send({"op": "reloaded", "id": message["id"]})
        else:
            log.error("worker: unknown message %r from the controller", op)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wakegate-worker", description="a wakegate proxy worker (started by "
                                     "`wakegate serve`, not by hand)")
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--board", type=int, required=True)
    parser.add_argument("--tls-listen", type=int, default=-1)
    parser.add_argument("--fds", type=int, default=-1, help="where services' own listeners are handed over")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s")
    import uvloop

    try:
        return uvloop.run(run_worker(args.control, args.listen, args.board, args.tls_listen, args.fds))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
