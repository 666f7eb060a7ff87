"""Keep-alive connections to one service's address.

``UpstreamPool`` keeps idle connections (last in, first out, so the warmest is
reused); ``UpstreamConnection`` is a thin protocol that hands every event to
the client exchange that currently owns it, and nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import socket

from .warm import WARM_PATH, PoolBase, UpstreamBase


class UpstreamConnection(UpstreamBase, asyncio.Protocol):
    """One TCP connection to a service; ``owner`` is the exchange using it, or None when idle. Its
    fields are UpstreamBase's (proxy/warm.py), whose data_received answers a warm exchange in C."""

    __slots__ = ()

    def __init__(self, pool: "UpstreamPool") -> None:
        self.pool = pool
        self.transport = None
        self.owner = None
        self.reused = False
        self.closed = False
        self.reading_paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def _data_received_slow(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # Bytes on an idle connection: the service broke framing; never reuse it.
            self.close()
            return
        owner.upstream_data(data)

    if WARM_PATH != "c":
        data_received = _data_received_slow

    def eof_received(self):
        return False  # close our side too; a half-closed upstream is of no use

    def connection_lost(self, exc) -> None:
        already = self.closed
        self.closed = True
        owner = self.owner
        if owner is not None:
            self.owner = None
            owner.upstream_lost(self)
        else:
            self.pool.discard(self)
        if not already:
            self.pool.forget(self)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_resume_writing()

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close after pending writes; the connection is never reused."""
        if not self.closed:
            self.closed = True
            self.owner = None
            self.transport.close()
            self.pool.discard(self)
            self.pool.forget(self)

    def abort(self) -> None:
        """Drop at once (a request was cut short); the service sees a reset."""
        if not self.closed:
            self.closed = True
            self.owner = None
            self.transport.abort()
            self.pool.discard(self)
            self.pool.forget(self)


class UpstreamPool(PoolBase):
    """Connections to one address: at most ``max_idle`` idle ones kept, at most
    ``max_connections`` open at once (0: no limit); beyond that, exchanges wait
    in arrival order for one to come back. ``idle``, ``waiters`` and ``max_idle`` are PoolBase's,
    which the warm path reads."""

    def __init__(self, host: str, port: int, max_idle: int, max_connections: int = 0) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.max_connections = max_connections
        self.idle: list[UpstreamConnection] = []
        self.opened = 0  # connections made, for tests and metrics
        self.open = 0  # connections open or being opened
        self.live: set[UpstreamConnection] = set()
        self.waiters: collections.deque = collections.deque()  # exchanges waiting for a connection

    def take(self) -> UpstreamConnection | None:
        """An idle connection to reuse, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    def can_connect(self) -> bool:
        return not self.max_connections or self.open < self.max_connections

    def wait(self, exchange) -> None:
        """Queue an exchange; it gets ``pool_ready(conn)`` (a connection, or None: connect now)."""
        self.waiters.append(exchange)

    def _next_waiter(self):
        waiters = self.waiters
        while waiters:
            exchange = waiters.popleft()
            if exchange.waiting_for_pool:
                return exchange
        return None

    def give_back(self, conn: UpstreamConnection) -> None:
        """Return a connection whose last response ended cleanly."""
        conn.owner = None
        if conn.closed:
            return
        if self.waiters:
            exchange = self._next_waiter()
            if exchange is not None:
                conn.reused = True
                if conn.reading_paused:
                    conn.resume_reading()
                exchange.pool_ready(conn)
                return
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        if conn.reading_paused:
            conn.resume_reading()  # an idle connection must notice the service closing it
        self.idle.append(conn)

    def reserve(self) -> None:
        """Count a connection about to be opened (before its task even starts)."""
        self.open += 1

    def unreserve(self) -> None:
        """A reserved connection never opened (refused, timed out, cancelled)."""
        self.open -= 1
        self._admit_waiter()

    def adopt(self, conn: UpstreamConnection) -> None:
        """A reserved connection is open."""
        self.opened += 1
        if conn.closed:  # lost before we even saw it
            self.unreserve()
        else:
            self.live.add(conn)

    async def connect(self) -> UpstreamConnection:
        """Open one connection; call reserve() first and adopt() or unreserve() after."""
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port)
        return conn

    def forget(self, conn: UpstreamConnection) -> None:
        """conn is closing: its place may go to a waiting exchange."""
        if conn in self.live:
            self.live.discard(conn)
            self.open -= 1
            self._admit_waiter()

    def _admit_waiter(self) -> None:
        while self.waiters and self.can_connect():
            exchange = self._next_waiter()
            if exchange is None:
                return
            self.reserve()
            exchange.pool_ready(None)

    def discard(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close_idle(self) -> None:
        """Close every idle connection (the service is going away)."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    async def drop_idle(self) -> None:
        """close_idle(), and return once every process's idle connections to it are closed (a
        snapshot must find no established sockets); here that is at once."""
        self.close_idle()
