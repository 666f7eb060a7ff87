"""The controller's side of the data path: the proxy processes it runs and how it talks to them.

``InProcess`` (workers = 1) runs the data path (proxy/worker.py) in the controller's own loop and
reaches it by calls. ``Workers`` (workers = N > 1) runs N ``python -m proxy.worker`` processes that
all accept on one listening socket the controller bound and passes on: the kernel queues new
connections once for all of them, so a worker that dies or restarts loses none of its backlog (with
SO_REUSEPORT each worker has a queue of its own, and the connections in a dead worker's queue are
reset), and a reload never closes the listener. Each worker has one Unix socket to the controller;
a worker that dies is restarted and its counts on the board are reclaimed, and a worker whose
controller dies exits (the socket ends; ``setpriv --pdeathsig`` backs that up).

Services' own listeners (``listen``, a Kubernetes pod's port) are bound by the controller too, and
handed to every worker over a second Unix socket (SCM_RIGHTS), also to a worker started later.

Both offer the same calls: answer, flush, flush_wait, upstream, stats, describe, reload, drain,
listen, unlisten.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from proxy.seam import Refused
from proxy.upstream import UpstreamPool
from proxy.worker import Channel, DataPath

from .backends import PDEATHSIG

log = logging.getLogger("wakegate.workers")

LISTEN_BACKLOG = 4096  # as the one-process listener; nginx's default on Linux is 511, HAProxy's is maxconn
WORKER_START_TIMEOUT = 30.0  # a worker that has not said ready by then is killed and started again
STATS_TIMEOUT = 2.0  # a scrape waits this long for a worker's counts, then uses the last ones
RESTART_BACKOFF_MIN = 0.1  # a worker that died is started again after this, doubling while it keeps dying
RESTART_BACKOFF_MAX = 10.0  # ... up to this; systemd's default RestartSec is 100 ms
STABLE_WORKER_SECONDS = 30.0  # a worker that lived this long resets that backoff
FLUSH_TIMEOUT = 2.0  # flush_wait gives the workers this long to close their idle connections to a service


SD_LISTEN_FDS_START = 3  # the first descriptor systemd passes (sd_listen_fds(3))


def activated_sockets() -> dict[str, socket.socket]:
    """Listening sockets passed by systemd socket activation (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES),
    by name: "proxy" and "admin" (FileDescriptorName= in the socket unit; without names, the first is
    the proxy's and the second the admin API's). The variables are removed, as sd_listen_fds(1) does,
    so no child mistakes them for its own."""
    pid, count = os.environ.pop("LISTEN_PID", ""), os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if not count or pid != str(os.getpid()):
        return {}
    labels = names.split(":") if names else ["proxy", "admin"]
    out = {}
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        label = labels[i] if i < len(labels) else f"fd{fd}"
        if label in out:
            raise ValueError(f"socket activation passed two sockets named {label!r}")
        out[label] = sock
    return out


def bind_listener(address) -> socket.socket:
    """The proxy listener every worker accepts on (inherited; see the module's contract)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _worker_env() -> dict:
    """The controller's environment, with wakegate's own folder first on the import path (so
    ``-m proxy.worker`` finds this very checkout whatever the working directory)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _answered(stats: dict | None) -> int | None:
    """Requests a process answered, from its exported counts (None: none received yet)."""
    if stats is None:
        return None
    return sum(sum(s["codes"].values()) for s in stats["services"].values())


class FleetPool(UpstreamPool):
    """The controller's own connections to one service (its readiness probes) that also speaks for
    the service's pool in every proxy process: closing idle connections closes theirs too, and a
    new upstream address (a container's published port) reaches them all."""

    _port = None  # until __init__ sets it: no broadcast of the first address

    def __init__(self, host: str, port: int, fleet, slot: int) -> None:
        self.fleet = None
        super().__init__(host, port, max_idle=2)
        self.fleet = fleet
        self.slot = slot

    @property
    def host(self) -> str:
        return self._host

    @host.setter
    def host(self, value: str) -> None:
        self._host = value
        self._moved()

    @property
    def port(self) -> int:
        return self._port

    @port.setter
    def port(self, value: int) -> None:
        self._port = value
        self._moved()

    def _moved(self) -> None:
        if self.fleet is not None and self._port is not None:
            self.fleet.upstream(self.slot, self._host, self._port)

    def close_idle(self) -> None:
        super().close_idle()
        self.fleet.flush(self.slot)

    async def drop_idle(self) -> None:
        super().close_idle()
        await self.fleet.flush_wait(self.slot)


class InProcess:
    """workers = 1: the data path in the controller's process."""

    count = 1

    def __init__(self, config, board, slots: dict[str, int], ask) -> None:
        self.path = DataPath(config, board, 0, slots, ask)
        self.started = time.monotonic()

    def listen(self, key: str, sock: socket.socket) -> None:
        """A service's own listener: served once a config routes it (at the next reload or start)."""
        self.path.give_listener(key, sock.dup())

    def unlisten(self, key: str) -> None:
        """No service has the address any more (the reload that removed the last one stopped serving it)."""
        self.path.drop_listener(key)

    async def start(self, sock: socket.socket | None = None, tls_sock: socket.socket | None = None) -> None:
        await self.path.start(sock, tls_sock)

    def answer(self, slot: int, refused: Refused | None) -> None:
        self.path.answer(slot, refused)

    def flush(self, slot: int) -> None:
        self.path.flush(slot)

    async def flush_wait(self, slot: int) -> None:
        self.path.flush(slot)

    def upstream(self, slot: int, host: str, port: int) -> None:
        self.path.move(slot, host, port)

    async def stats(self) -> list[dict]:
        return [self.path.stats()]

    def describe(self) -> list[dict]:
        return [{"worker": 0, "pid": os.getpid(), "alive": True, "restarts": 0,
                 "connections": len(self.path.server.connections), "requests": _answered(self.path.stats())}]

    async def reload(self, config, slots: dict[str, int]) -> None:
        await self.path.reload(config, slots)

    async def drain(self, grace: float) -> int:
        return await self.path.drain(grace)


class _Worker:
    """One worker process as the controller knows it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.pid: int | None = None
        self.ready = False
        self.started = 0.0
        self.restarts = 0
        self.backoff = RESTART_BACKOFF_MIN
        self.last_stats: dict | None = None
        self.reader: asyncio.Task | None = None
        self.generation = 0  # of the config it was given
        self.fds: socket.socket | None = None  # where services' own listeners are handed over


def hand_over(channel: socket.socket, key: str, sock: socket.socket | None) -> None:
    """Send one listening socket, named by its address, to a worker (SCM_RIGHTS on SOCK_SEQPACKET:
    one message, one descriptor: "+address"), or tell it to let go of one ("-address", no descriptor:
    on the same channel, so it can never overtake the socket it is about)."""
    try:
        if sock is None:
            channel.send(b"-" + key.encode())
        else:
            socket.send_fds(channel, [b"+" + key.encode()], [sock.fileno()])
    except OSError as exc:  # the worker is gone: its successor gets every listener when it starts
        log.debug("handing over %s: %s", key, exc)


class Workers:
    """workers = N > 1: N proxy processes on one inherited listener."""

    def __init__(self, count: int, config, shared_board, slots: dict[str, int], ask, log_level: str = "info") -> None:
        self.count = count
        self.config = config
        self.shared = shared_board
        self.slots = slots
        self.ask = ask  # (slot) -> None: a worker holds requests for that service
        self.log_level = log_level
        self.listener: socket.socket | None = None
        self.tls_listener: socket.socket | None = None
        self.workers = [_Worker(i) for i in range(count)]
        self.retired: list[dict] = []  # the last counts of workers that died, so totals never go back
        self.generation = 0  # reloads so far: a worker that started with an older config gets the new one
        self.stopping = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._restarts: set[asyncio.Task] = set()
        self.port_listeners: dict[str, socket.socket] = {}  # services' own listeners, by address

    async def start(self, sock: socket.socket, tls_sock: socket.socket | None = None) -> None:
        self.listener = sock
        self.tls_listener = tls_sock
        await asyncio.gather(*(self._spawn(w) for w in self.workers))

    async def _spawn(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds_ours, fds_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            fds = [theirs.fileno(), self.listener.fileno(), self.shared.fd, fds_theirs.fileno()]
            argv = PDEATHSIG + [sys.executable, "-m", "proxy.worker", "--control", str(theirs.fileno()),
                                "--listen", str(self.listener.fileno()), "--board", str(self.shared.fd),
                                "--fds", str(fds_theirs.fileno()), "--log-level", self.log_level]
            if self.tls_listener is not None:
                argv += ["--tls-listen", str(self.tls_listener.fileno())]
                fds.append(self.tls_listener.fileno())
            worker.proc = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL, env=_worker_env())
        except BaseException:
            fds_ours.close()
            raise
        finally:
            theirs.close()
            fds_theirs.close()
        if worker.fds is not None:
            worker.fds.close()
        worker.fds = fds_ours
        for key, sock in self.port_listeners.items():
            hand_over(fds_ours, key, sock)
        worker.pid = worker.proc.pid
        worker.started = time.monotonic()
        worker.ready = False
        worker.channel = await Channel.over(ours)
        ready = loop.create_future()
        worker.reader = loop.create_task(self._read(worker, ready), name=f"worker-{worker.index}")
        worker.generation = self.generation
        worker.channel.send({"op": "start", "worker": worker.index, "config": self.config, "slots": self.slots,
                             "board_slots": self.shared.slots, "board_workers": self.shared.workers})
        try:
            await asyncio.wait_for(asyncio.shield(ready), WORKER_START_TIMEOUT)
        except asyncio.TimeoutError:  # _read restarts it once it is gone
            log.error("worker %d (pid %d) did not start within %.0fs; killing it", worker.index, worker.pid,
                      WORKER_START_TIMEOUT)
            worker.proc.kill()

    async def _read(self, worker: _Worker, ready: asyncio.Future) -> None:
        channel = worker.channel
        while True:
            message = await channel.receive()
            if message is None:
                break
            op = message["op"]
            if op == "ask":
                self.ask(message["slot"])
            elif op == "ready":
                worker.ready = True
                if worker.generation != self.generation:  # a reload happened while it started
                    worker.generation = self.generation
                    channel.send({"op": "config", "config": self.config, "slots": self.slots, "id": 0})
                ready.done() or ready.set_result(None)
                log.info("worker %d ready (pid %d)", worker.index, worker.pid)
            elif op in ("stats", "reloaded", "flushed"):
                if op == "stats":
                    worker.last_stats = message["stats"]
                future = self._waiting.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message.get("stats"))
            elif op == "drained":
                if message["cut"]:
                    log.warning("worker %d: %d connections cut at the end of the drain", worker.index, message["cut"])
        # The worker is gone (or going): reap it, give back what it held, start another.
        ready.done() or ready.set_result(False)
        await channel.close()
        code = await asyncio.get_running_loop().run_in_executor(None, worker.proc.wait)
        self.shared.board.reclaim(worker.index)  # its in-flight, tunnels and held requests died with it
        if worker.last_stats is not None:
            self.retired.append(worker.last_stats)
            worker.last_stats = None
        worker.ready = False
        if self.stopping:
            return
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        log.error("worker %d (pid %d) %s; starting it again", worker.index, worker.pid, how)
        if time.monotonic() - worker.started >= STABLE_WORKER_SECONDS:
            worker.backoff = RESTART_BACKOFF_MIN
        delay = worker.backoff
        worker.backoff = min(worker.backoff * 2, RESTART_BACKOFF_MAX)
        worker.restarts += 1
        task = asyncio.get_running_loop().create_task(self._restart(worker, delay))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, worker: _Worker, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self.stopping:
            await self._spawn(worker)

    def _broadcast(self, message: dict) -> None:
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.send(message)

    async def _ask_all(self, message: dict, timeout: float) -> list:
        """Send a message with an id to every live worker and wait for their replies (None: none came)."""
        loop = asyncio.get_running_loop()
        futures = []
        for worker in self.workers:
            if worker.channel is None or not worker.ready:
                continue
            ident = next(self._ids)
            future = self._waiting[ident] = loop.create_future()
            worker.channel.send({**message, "id": ident})
            futures.append((ident, future))
        if not futures:
            return []
        done, _ = await asyncio.wait([f for _, f in futures], timeout=timeout)
        out = []
        for ident, future in futures:
            self._waiting.pop(ident, None)
            out.append(future.result() if future in done else None)
            future.cancel()
        return out

    # ---- the calls every fleet offers ----

    def listen(self, key: str, sock: socket.socket) -> None:
        """A service's own listener: every worker gets it now (and a worker started later, at its start)."""
        self.port_listeners[key] = sock
        for worker in self.workers:
            if worker.fds is not None:
                hand_over(worker.fds, key, sock)

    def unlisten(self, key: str) -> None:
        """No service has the address any more (the reload that removed the last one stopped serving it)."""
        self.port_listeners.pop(key, None)
        for worker in self.workers:
            if worker.fds is not None:
                hand_over(worker.fds, key, None)

    def answer(self, slot: int, refused: Refused | None) -> None:
        self._broadcast({"op": "answer", "slot": slot, "refused": None if refused is None else
                         (refused.status, refused.reason, refused.retry_after)})

    def flush(self, slot: int) -> None:
        self._broadcast({"op": "flush", "slot": slot})

    async def flush_wait(self, slot: int) -> None:
        await self._ask_all({"op": "flush", "slot": slot, "ack": True}, FLUSH_TIMEOUT)

    def upstream(self, slot: int, host: str, port: int) -> None:
        self._broadcast({"op": "upstream", "slot": slot, "host": host, "port": port})

    async def stats(self) -> list[dict]:
        """Every worker's counts: live ones asked now (or their last answer), dead ones' last."""
        await self._ask_all({"op": "stats"}, STATS_TIMEOUT)
        return [w.last_stats for w in self.workers if w.last_stats is not None] + self.retired

    def describe(self) -> list[dict]:
        """Per worker: pid, restarts, and its counts as of the last scrape (GET /metrics)."""
        return [{"worker": w.index, "pid": w.pid, "alive": w.ready, "restarts": w.restarts,
                 "connections": (w.last_stats or {}).get("connections"), "requests": _answered(w.last_stats)}
                for w in self.workers]

    async def reload(self, config, slots: dict[str, int]) -> None:
        self.config, self.slots = config, slots  # what a worker started later gets
        self.generation += 1
        for worker in self.workers:
            if worker.ready:
                worker.generation = self.generation
        await self._ask_all({"op": "config", "config": config, "slots": slots}, WORKER_START_TIMEOUT)

    async def drain(self, grace: float) -> int:
        """SIGTERM every worker (each drains its connections) and wait for them all to exit."""
        self.stopping = True
        for listener in (self.listener, self.tls_listener):  # refused once the workers close theirs too
            if listener is not None:
                listener.close()
        self.listener = self.tls_listener = None
        self.port_listeners.clear()  # the runtime closes its own
        for task in list(self._restarts):
            task.cancel()
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.terminate()
        readers = [w.reader for w in self.workers if w.reader is not None]
        done, pending = await asyncio.wait(readers, timeout=grace + 5.0) if readers else (set(), set())
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                log.warning("worker %d (pid %d) did not exit after the drain; killing it", worker.index, worker.pid)
                worker.proc.kill()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        for task in pending:
            task.cancel()
        for worker in self.workers:
            if worker.fds is not None:
                worker.fds.close()
                worker.fds = None
        return 0
