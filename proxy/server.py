"""The client side of the proxy: one asyncio protocol per client connection.

It feeds bytes to the sans-io parser (proxy.http11), routes each request head,
forwards it over a pooled upstream connection and streams both bodies with
backpressure. Timeouts are deadlines swept by one ticker per server.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from time import perf_counter

from .http11 import (
    CHUNKED,
    UNTIL_CLOSE,
    ChunkedScanner,
    ProtocolError,
    build_request,
    build_response,
    parse_request,
    parse_response,
)

from .board import STATE_NAMES as SERVICE_STATE_NAMES
from .metrics import CLIENT_ERROR_REASONS, ProxyStats, ServiceStats
from .pages import STATE_PATH, state_response, waiting_page, wants_html
from .routing import PortRouter, Router
from .seam import Refused
from .upstream import UpstreamConnection, UpstreamPool
from .warm import CLIENT_STATES, WARM_PATH, ClientBase, RouteBase, ServerBase

log = logging.getLogger("wakegate.proxy")

# Buffering limits, named with their precedent.
MAX_PIPELINE_BYTES = 64 * 1024  # client bytes read ahead of the current exchange; uvloop's default high-water mark
MAX_PENDING_BODY_BYTES = 64 * 1024  # request body held while the upstream connects; same mark
TICK_MIN, TICK_MAX = 0.01, 0.5  # deadline sweep period bounds, seconds
FD_CHECK_SECONDS = 1.0  # how often the sweep checks that a descriptor can still be opened
FD_WARN_SECONDS = 10.0  # at most one "out of file descriptors" warning this often

_UNPARSED = object()  # "no parse result handed over" (None means: parsed, head incomplete)

MIN_BODY_RATE = 500.0  # bytes/s a body must average while it holds an upstream connection; mod_reqtimeout's MinRate
MAX_INTERIM_RESPONSES = 5  # 1xx responses relayed per request, then 502; Go net/http allows 5
# Methods retried once on a fresh connection when a pooled one turns out closed: safe methods only, a
# subset of what RFC 9110 section 9.2.2 calls idempotent (PUT and DELETE are idempotent by the RFC,
# but applications do not always make them so).
RETRY_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))

# Client connection states (the warm path's C code uses the same numbers: proxy/_warm.c)
S_HEAD, S_BODY, S_HELD, S_CONNECTING, S_EXCHANGE, S_TUNNEL, S_CLOSED = range(7)
STATE_NAMES = ("HEAD", "BODY", "HELD", "CONNECTING", "EXCHANGE", "TUNNEL", "CLOSED")
assert CLIENT_STATES == (S_HEAD, S_BODY, S_HELD, S_CONNECTING, S_EXCHANGE, S_TUNNEL, S_CLOSED)

# Every transition of a client connection, in one place (h11's _state.py is the model):
# state -> {event: next state}. Anything else raises IllegalTransition.
CLIENT_TRANSITIONS = {
    # waiting for a request head (idle between requests, or reading one)
    S_HEAD: {"read_body": S_BODY, "hold": S_HELD, "connect": S_CONNECTING, "attach": S_EXCHANGE, "close": S_CLOSED},
    # admitted; its body (up to MAX_PENDING_BODY_BYTES) comes in before a connection is taken
    S_BODY: {"connect": S_CONNECTING, "attach": S_EXCHANGE, "close": S_CLOSED},
    # held while the service wakes; the body is read into pending meanwhile
    S_HELD: {"connect": S_CONNECTING, "attach": S_EXCHANGE, "respond": S_HEAD, "close": S_CLOSED},
    # opening an upstream connection, or queued for one at the service's limit
    S_CONNECTING: {"attach": S_EXCHANGE, "respond": S_HEAD, "close": S_CLOSED},
    # the head went upstream: body and response stream (connect/attach: the one retry of a safe
    # request whose pooled connection turned out closed)
    S_EXCHANGE: {"respond": S_HEAD, "connect": S_CONNECTING, "attach": S_EXCHANGE, "upgrade": S_TUNNEL,
                 "close": S_CLOSED},
    # bytes both ways after a 101
    S_TUNNEL: {"close": S_CLOSED},
    S_CLOSED: {},
}

# Reasons reading from the client is paused (bits)
P_UPSTREAM_FULL, P_PIPELINE_FULL, P_PENDING_FULL, P_CLIENT_NOT_READING = 1, 2, 4, 8
P_OURS = P_UPSTREAM_FULL | P_PENDING_FULL  # pauses that stop a request body for wakegate's reasons

REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

_error_cache: dict[tuple[int, bool, bool, int], bytes] = {}


def error_response(status: int, keep_alive: bool = False, head_only: bool = False, retry_after: float = 0) -> bytes:
    """A complete plain-text response from wakegate itself (Retry-After in whole seconds, if any)."""
    retry = max(1, int(retry_after + 0.999)) if retry_after else 0
    key = (status, keep_alive, head_only, retry)
    cached = _error_cache.get(key)
    if cached is None:
        reason = REASONS.get(status, "Error")
        body = f"{status} {reason}\n".encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            + (f"Retry-After: {retry}\r\n" if retry else "")
            + ("" if keep_alive else "Connection: close\r\n")
            + "\r\n"
        ).encode()
        cached = _error_cache[key] = head if head_only else head + body
    return cached


class ServiceRoute(RouteBase):
    """What a request is routed to: a service's name, its upstream pool, its gate (the
    acquire/release seam, proxy/gate.py), its no-wake rules and its waiting page. The fields are
    RouteBase's (proxy/warm.py), which the warm path reads without a lookup."""

    __slots__ = ()

    def __init__(self, name: str, pool: UpstreamPool, service=None, no_wake=None) -> None:
        self.name = name
        self.name_bytes = name.encode()  # as the access log writes it
        self.pool = pool
        self.service = service
        self.no_wake = no_wake  # (path prefixes, user-agent substrings, status) or None
        self.stats = ServiceStats()
        self.pool_key = None  # what the pool was made from: a reload keeps the pool when it is the same
        self.wait_page_after = None  # seconds a browser's request is held before it gets the waiting page

    def must_not_wake(self, head) -> bool:
        """A request that only asks whether the service is up (monitors): never a reason to wake it."""
        paths, agents, _status = self.no_wake
        path = head.path
        for prefix in paths:
            if path.startswith(prefix):
                return True
        if agents:
            for name, value in head.headers:
                if name.lower() == b"user-agent":
                    return any(agent in value for agent in agents)
        return False


class Limits:
    """The [proxy] settings the data path reads, flattened for speed."""

    __slots__ = (
        "head_timeout",
        "keepalive_timeout",
        "body_timeout",
        "connect_timeout",
        "upstream_timeout",
        "tunnel_timeout",
        "send_timeout",
        "max_head_size",
        "max_body_size",
        "unknown_host_status",
    )

    def __init__(self, settings) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(settings, name))


class ProxyServer(ServerBase):
    """Listens for clients; owns the router, the connections and the deadline ticker. The fields every
    warm exchange reads (draining, measure, server_timing, warm, access_log) are ServerBase's."""

    def __init__(self, settings, router: Router, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.settings = settings
        self.limits = Limits(settings)
        self.router = router
        self.loop = loop or asyncio.get_event_loop()
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.stats = ProxyStats()
        self.access_log = None  # an AccessLog, or None when off
        self.server_timing = False
        self.measure = True  # [metrics] enabled
        self.warm = True  # new connections may take the warm path (proxy/_warm.c) where it is built
        self.server: asyncio.AbstractServer | None = None
        self.tls_server: asyncio.AbstractServer | None = None
        self.port_servers: dict[str, asyncio.AbstractServer] = {}  # services' own listeners, by address
        self._ticker: asyncio.TimerHandle | None = None
        self._fd_checked = 0.0
        self._fd_warned = 0.0
        timeouts = [getattr(self.limits, n) for n in self.limits.__slots__ if n.endswith("timeout")]
        self.tick = min(TICK_MAX, max(TICK_MIN, min(timeouts) / 4))

    async def start(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self),
                self.settings.listen.host,
                self.settings.listen.port,
                backlog=4096,
                reuse_address=True,
            )
        else:
            self.server = await self.loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=4096)
        self._ticker = self.loop.call_later(self.tick, self._sweep)

    async def start_tls(self, sock: socket.socket, context) -> None:
        """The HTTPS listener: TLS terminated here (the loop's own SSL), a handshake cut at head_timeout."""
        self.tls_server = await self.loop.create_server(lambda: ClientConnection(self, b"https"), sock=sock,
                                                        backlog=4096, ssl=context,
                                                        ssl_handshake_timeout=self.limits.head_timeout)

    async def start_port(self, key: str, sock: socket.socket, router: PortRouter) -> None:
        """A service's own listener (``listen`` in its config, a pod's port): every request on it goes
        to router's members."""
        self.port_servers[key] = await self.loop.create_server(
            lambda: ClientConnection(self, port_router=router), sock=sock, backlog=4096)

    def stop_port(self, key: str) -> None:
        """Stop accepting on a service's own listener; its open connections finish on their own."""
        server = self.port_servers.pop(key, None)
        if server is not None:
            server.close()

    @property
    def sockets(self):
        return self.server.sockets if self.server else []

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.body_deadline and now >= conn.body_deadline:
                conn.on_body_deadline()
            if conn.deadline and now >= conn.deadline:
                conn.on_deadline()
        if now - self._fd_checked >= FD_CHECK_SECONDS:
            self._fd_checked = now
            self._check_descriptors(now)
        self._ticker = self.loop.call_later(self.tick, self._sweep)

    def _check_descriptors(self, now: float) -> None:
        """libuv meets a failed accept() (EMFILE) by accepting and closing the pending connections
        with a spare descriptor, and tells nobody: see it here, count it and say it."""
        try:
            os.close(os.open(os.devnull, os.O_RDONLY))
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                return
        errors = self.stats.accept_errors
        errors["fd_limit"] = errors.get("fd_limit", 0) + 1
        if now - self._fd_warned >= FD_WARN_SECONDS:
            self._fd_warned = now
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.warning("out of file descriptors (limit %d, %d client connections): new connections are being "
                        "dropped", limit, len(self.connections))

    async def drain(self, grace: float) -> int:
        """Stop accepting, let in-flight requests finish within grace; return those cut off."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        if self.tls_server is not None:
            self.tls_server.close()
        for key in list(self.port_servers):
            self.stop_port(key)
        for conn in list(self.connections):
            conn.drain()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(min(0.05, grace))
        cut = len(self.connections)
        for conn in list(self.connections):
            conn.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        return cut


class IllegalTransition(RuntimeError):
    """A client connection was asked to move in a way its transition table does not allow."""


class ClientConnection(ClientBase, asyncio.Protocol):
    """One client connection and the exchange (request, upstream, response) under way on it.

    Its state changes only through ``_to(event)`` (the table CLIENT_TRANSITIONS), and it ends only
    through ``_teardown()``, whichever side ends it. Its fields are ClientBase's (proxy/warm.py): with
    the C extension, data_received handles a warm exchange in C (proxy/_warm.c: a keep-alive request
    to an awake service over an idle pooled connection, its response whole in one read) and leaves
    the fields as this class's own code would; anything else comes to _data_received_slow.
    """

    def __init__(self, server: ProxyServer, proto: bytes = b"http", port_router: PortRouter | None = None) -> None:
        self.server = server
        self.proto = proto  # X-Forwarded-Proto upstream
        self.limits = server.limits
        self.loop = server.loop
        self.port_router = port_router  # a service's own listener: its members, whatever the Host
        self.transport = None
        self.client_addr = b""
        self.client_host = ""
        self.state = S_HEAD
        self.buf = bytearray()  # client bytes not yet consumed
        self.deadline = 0.0  # the current phase's deadline (loop time; 0: none)
        self.body_deadline = 0.0  # the request body's deadline while wakegate reads it (0: none)
        self.read_paused = 0  # P_* bits
        self.write_paused = False
        # the exchange
        self.req = None
        self.route: ServiceRoute | None = None
        self.req_left = 0
        self.req_scanner = None
        self.req_body_done = True
        self.req_body_seen = 0
        self.body_attached_at = 0.0  # loop time the body began to hold an upstream connection
        self.body_seen_at_attach = 0
        self.up_head = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.upstream: UpstreamConnection | None = None
        self.lease = None  # the controller lease of the exchange under way
        self.connect_task: asyncio.Task | None = None
        self._pool_of_task: dict = {}  # connect task -> the pool it reserved a slot in
        self.waiting_for_pool = False
        self.retried = False
        self.resp = None
        self.rbuf = bytearray()
        self.resp_left = 0
        self.resp_scanner = None
        self.interim = 0  # 1xx responses relayed for this request
        self.responded = False  # bytes of a final response were written
        self.keep = False
        self.client_eof = False
        self.idle = False  # between requests, with the keep-alive deadline running
        # the timeline of the exchange under way (perf_counter seconds; 0: not yet)
        self.t0 = 0.0  # first byte of the head
        self.t_held = 0.0
        self.t_connect = 0.0
        self.t_sent = 0.0
        self.t_first = 0.0
        self.queue_s = 0.0
        self.connect_s = 0.0
        self.status_sent = 0
        self.bytes_out = 0
        self._warm_limits(server.warm)

    # ---- the transition table's one door ----

    def _to(self, event: str) -> None:
        new = CLIENT_TRANSITIONS[self.state].get(event)
        if new is None:
            raise IllegalTransition(f"client connection: event {event!r} in state {STATE_NAMES[self.state]}")
        self.state = new

    # ---- asyncio callbacks ----

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_host = peer[0] if peer else "unknown"
        self.client_addr = self.client_host.encode()
        self.server.connections.add(self)
        self.deadline = self.loop.time() + self.limits.head_timeout

    def _data_received_slow(self, data: bytes, head=None) -> None:
        """Client bytes; head: the request head the warm path parsed from data's start and left to us."""
        state = self.state
        if head is not None:
            self.idle = False
            if head.length == len(data) and head.body_length == 0:
                self._begin(head)
            else:
                self._consume(data, head)
            return
        if state == S_HEAD and not self.buf and not self.write_paused:
            self.t0 = perf_counter()
            # Fast path: one whole request head without a body, in one read.
            try:
                head = parse_request(data, 0, self.limits.max_head_size)
            except ProtocolError as exc:
                self._reject(exc.status, str(exc))
                return
            if head is not None and head.length == len(data) and head.body_length == 0:
                self.idle = False
                self._begin(head)
                return
        elif state == S_TUNNEL:
            self.upstream.transport.write(data)
            self.deadline = self.loop.time() + self.limits.tunnel_timeout
            return
        if self.buf:
            self.buf += data
            data = bytes(self.buf)
            self.buf.clear()
        self._consume(data)

    if WARM_PATH != "c":
        data_received = _data_received_slow

    def eof_received(self):
        state = self.state
        if state == S_TUNNEL:
            if self.upstream is not None and self.upstream.transport.can_write_eof():
                self.upstream.transport.write_eof()
            return True
        if state in (S_HELD, S_CONNECTING, S_EXCHANGE) and self.req_body_done:
            self.client_eof = True  # it can still read the response under way; then we close
            return True
        return False

    def connection_lost(self, exc) -> None:
        self._teardown()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()
        if self.state == S_EXCHANGE:
            self._wait_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()
        if self.state == S_EXCHANGE:
            self._wait_upstream()
        if self.read_paused & P_CLIENT_NOT_READING:
            # The client read what we answered: go on with the requests it sent meanwhile.
            self._resume(P_CLIENT_NOT_READING)
            if self.state == S_HEAD and self.buf:
                data = bytes(self.buf)
                self.buf.clear()
                self._consume(data)

    def _wait_upstream(self) -> None:
        """Deadline for the response: the service's, or the client's while it reads too slowly."""
        limits = self.limits
        self.deadline = self.loop.time() + (limits.send_timeout if self.write_paused else limits.upstream_timeout)

    # ---- reading pauses ----

    def _pause(self, bit: int) -> None:
        if not self.read_paused and self.state != S_CLOSED:
            self.transport.pause_reading()
        self.read_paused |= bit
        if bit & P_OURS:
            self.body_deadline = 0.0  # we stopped reading: the body's clock is not the client's fault

    def _resume(self, bit: int) -> None:
        if self.read_paused & bit:
            self.read_paused &= ~bit
            if not self.read_paused and self.state != S_CLOSED:
                self.transport.resume_reading()
                if not self.req_body_done:
                    self._arm_body_deadline()

    def upstream_pause_writing(self) -> None:
        self._pause(P_UPSTREAM_FULL)
        if self.state == S_EXCHANGE and self.resp is None:
            self.deadline = self.loop.time() + self.limits.upstream_timeout  # the service is not reading

    def upstream_resume_writing(self) -> None:
        self._resume(P_UPSTREAM_FULL)
        if self.state == S_EXCHANGE and self.resp is None and not self.req_body_done:
            self.deadline = 0.0

    # ---- requests ----

    def _consume(self, data: bytes, parsed=None) -> None:
        """Use as many client bytes as the current state allows; keep the rest (parsed: the head at
        data's start, when the caller parsed it already)."""
        pos = 0
        n = len(data)
        while pos < n:
            state = self.state
            if state == S_HEAD:
                if self.write_paused:
                    # The client does not read what we answer: read no more requests from it until
                    # it does (responses wakegate makes itself must respect backpressure too).
                    self.buf += data[pos:] if pos else data
                    self._pause(P_CLIENT_NOT_READING)
                    return
                if parsed is not None:
                    head, parsed = parsed, None
                else:
                    try:
                        head = parse_request(data, pos, self.limits.max_head_size)
                    except ProtocolError as exc:
                        self._reject(exc.status, str(exc))
                        return
                if head is None:
                    if self.idle:
                        # A new head has begun: it must be complete within head_timeout.
                        self.idle = False
                        self.deadline = self.loop.time() + self.limits.head_timeout
                    self.buf += data[pos:] if pos else data
                    return
                pos += head.length
                self.idle = False
                self._begin(head)
                continue
            if state == S_TUNNEL:
                self.upstream.transport.write(data[pos:] if pos else data)
                return
            if state == S_CLOSED:
                return
            if not self.req_body_done:
                k = self._request_body(data, pos, n)
                if k < 0:
                    return
                pos += k
                continue
            # The exchange is under way and its body is in: read ahead, within bounds.
            self.buf += data[pos:] if pos else data
            if len(self.buf) > MAX_PIPELINE_BYTES:
                self._pause(P_PIPELINE_FULL)
            return

    def _begin(self, head) -> None:
        """A request head is in: check it, route it and start its exchange."""
        path = head.path
        if path[0] != 47 and path != b"*":  # 47: "/"
            if head.method == b"CONNECT":
                self._reject(501, "CONNECT is not supported")
            else:
                self._reject(400, "request target is not a path")
            return
        limits = self.limits
        if limits.max_body_size and head.body_length > limits.max_body_size:
            self._reject(413, "body too large")
            return
        # the server's current table (a reload replaces it), or the service's own listener
        route = (self.port_router or self.server.router).route(head.host, path)
        if route is None:
            self._local_response(head, limits.unknown_host_status)
            return
        self.req = head
        self.route = route
        self.t_held = self.t_connect = self.t_sent = self.t_first = self.queue_s = self.connect_s = 0.0
        self.status_sent = 0
        self.interim = 0
        body_length = head.body_length
        self.req_body_seen = 0
        if body_length == 0:
            self.req_body_done = True
        elif body_length == CHUNKED:
            self.req_body_done = False
            self.req_scanner = ChunkedScanner()
        else:
            self.req_body_done = False
            self.req_left = body_length
        self.up_head = build_request(head, self.client_addr, self.proto)
        self.responded = False
        self.retried = False
        service = route.service
        if service is not None:
            if route.wait_page_after is not None and head.path.startswith(STATE_PATH):
                state = SERVICE_STATE_NAMES[service.board.state(service.slot)]
                keep = head.keep_alive and head.body_length == 0 and not self.server.draining
                self._local_response(head, 200, out=state_response(route.name, state, state == "ready", keep))
                return
            if route.no_wake is not None and not service.awake and route.must_not_wake(head):
                self._local_response(head, route.no_wake[2], retry_after=1)
                return
            try:
                lease = service.acquire()  # the seam: no suspension when READY
            except Refused as refused:
                self._local_response(head, refused.status, retry_after=refused.retry_after)
                return
            self.lease = lease
            if not lease.granted:
                self.t_held = perf_counter()
                self._to("hold")  # the body (if any) is read into pending meanwhile
                self.deadline = 0.0  # the controller answers for the wake deadline
                if route.wait_page_after is not None and self.req_body_done and wants_html(head):
                    self.deadline = self.loop.time() + route.wait_page_after  # then the waiting page
                if not self.req_body_done:
                    self._arm_body_deadline()
                lease.on_ready = self._lease_ready
                return
        if not self.req_body_done and not head.expect_continue:
            # Read the body before taking an upstream connection, up to MAX_PENDING_BODY_BYTES: a
            # client that trickles a small body holds no connection to the service (as nginx
            # buffers request bodies). A client that waits for 100 Continue goes upstream at once.
            self._to("read_body")
            self.deadline = 0.0
            self._arm_body_deadline()
            return
        self._go_upstream()

    def _go_upstream(self) -> None:
        pool = self.route.pool
        conn = pool.take()
        if conn is not None:
            self._attach(conn)
        elif pool.can_connect():
            pool.reserve()
            self._connect()
        else:  # at the service's connection limit: wait for one, in arrival order
            self._to("connect")
            self.waiting_for_pool = True
            self.deadline = self.loop.time() + self.limits.upstream_timeout
            pool.wait(self)

    def pool_ready(self, conn) -> None:
        """The pool's answer to wait(): a free connection, or a reserved slot to connect with."""
        self.waiting_for_pool = False
        if conn is not None:
            self._attach(conn)
        else:
            self._connect()

    def _lease_ready(self, lease) -> None:
        """The service woke (or could not): the held request goes on, or is answered."""
        if self.state != S_HELD or lease is not self.lease:
            lease.release()
            return
        self.queue_s = perf_counter() - self.t_held
        if lease.refused is not None:
            refused = lease.refused
            self._upstream_error(refused.status, refused.reason, retry_after=refused.retry_after)
            return
        self._go_upstream()

    def _connect(self) -> None:
        """Open a connection for a slot already reserved in the pool."""
        self.t_connect = perf_counter()
        if self.state != S_CONNECTING:
            self._to("connect")
        self.deadline = self.loop.time() + self.limits.connect_timeout
        pool = self.route.pool
        self.connect_task = task = self.loop.create_task(pool.connect())
        self._pool_of_task[task] = pool
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self._pool_of_task.pop(task).unreserve()
            if task.cancelled():
                return
        else:
            self._pool_of_task.pop(task).adopt(task.result())
        exc = task.exception()
        if self.connect_task is not task or self.state != S_CONNECTING:
            if exc is None:  # connected just as the client left: keep it for the next one
                conn = task.result()
                conn.pool.give_back(conn)
            return
        self.connect_task = None
        if exc is not None:
            log.warning("upstream %s:%d for %s: %s", self.route.pool.host, self.route.pool.port, self.route.name, exc)
            self._count_upstream_error("refused")
            self._upstream_error(502, "upstream refused the connection")
            return
        self._attach(task.result())

    def _attach(self, conn: UpstreamConnection) -> None:
        """Send the request head (and any body held so far) on conn."""
        now = self.t_sent = perf_counter()
        if self.t_connect:
            self.connect_s = now - self.t_connect
            self.t_connect = 0.0
        self.upstream = conn
        conn.owner = self
        self._to("attach")
        if self.req_body_done:
            self.deadline = self.loop.time() + self.limits.upstream_timeout
        else:
            self.deadline = 0.0  # the body's deadline governs until the body is in
            self.body_attached_at = self.loop.time()
            self.body_seen_at_attach = self.req_body_seen
            self._arm_body_deadline()
        if self.write_paused:
            conn.pause_reading()
        if self.pending:
            conn.transport.write(self.up_head + b"".join(self.pending))
            self.pending.clear()
            self.pending_size = 0
            self._resume(P_PENDING_FULL)
        else:
            conn.transport.write(self.up_head)

    def _arm_body_deadline(self) -> None:
        """The client must go on sending its body: within body_timeout of its last bytes, and, while
        the body holds an upstream connection, at MIN_BODY_RATE on average after a body_timeout's
        grace (Apache mod_reqtimeout's body=20,MinRate=500 rule), so a trickle cannot hold it."""
        if self.read_paused & P_OURS:
            self.body_deadline = 0.0  # wakegate, not the client, stopped the body
            return
        now = self.loop.time()
        deadline = now + self.limits.body_timeout
        if self.upstream is not None:
            allowance = (self.req_body_seen - self.body_seen_at_attach) / MIN_BODY_RATE
            deadline = min(deadline, self.body_attached_at + self.limits.body_timeout + allowance)
        self.body_deadline = deadline

    def _request_body(self, data: bytes, pos: int, n: int) -> int:
        """Forward request body bytes from data[pos:]; how many were body, or -1 if closed."""
        if self.req_scanner is not None:
            try:
                k = self.req_scanner.feed(data, pos)
            except ProtocolError as exc:
                self._reject(exc.status, str(exc))
                return -1
            done = self.req_scanner.done
        else:
            k = min(self.req_left, n - pos)
            self.req_left -= k
            done = self.req_left == 0
        if k:
            chunk = data if (pos == 0 and k == n) else data[pos : pos + k]
            self.req_body_seen += k
            max_body = self.limits.max_body_size
            if max_body and self.req_body_seen > max_body:
                self._reject(413, "body too large")
                return -1
            if self.upstream is not None:
                self.upstream.transport.write(chunk)
            else:
                self.pending.append(chunk)
                self.pending_size += k
                if self.pending_size > MAX_PENDING_BODY_BYTES and self.state != S_BODY:
                    self._pause(P_PENDING_FULL)
        if done:
            self.req_body_done = True
            self.req_scanner = None
            self.body_deadline = 0.0
            if self.state == S_EXCHANGE and self.resp is None:
                self.deadline = self.loop.time() + self.limits.upstream_timeout
        else:
            self._arm_body_deadline()
        if self.state == S_BODY and (done or self.pending_size > MAX_PENDING_BODY_BYTES):
            self._go_upstream()  # the body is in, or too large to hold: stream the rest
        return k

    # ---- responses ----

    def upstream_data(self, data: bytes) -> None:
        parsed = _UNPARSED
        if self.resp is None and not self.rbuf:
            self.t_first = perf_counter()
            # Fast path: a whole final response with a Content-Length body, in one read.
            req = self.req
            try:
                resp = parse_response(data, 0, self.limits.max_head_size, req.is_head)
            except ProtocolError as exc:
                self._upstream_broken(f"invalid response head: {exc}")
                return
            if (
                resp is not None
                and resp.status >= 200
                and resp.body_length >= 0
                and resp.length + resp.body_length == len(data)
            ):
                self.resp = resp
                self.responded = True
                self.status_sent = resp.status
                self.keep = keep = req.keep_alive and self.req_body_done and not self.server.draining
                out = build_response(resp, keep, req.version, self._timing() if self.server.server_timing else b"")
                self.bytes_out = len(out) + resp.body_length
                self.transport.write(out + data[resp.length :])
                self._finish(True)
                return
            parsed = resp  # not the fast case: _response_head goes on from this parse, not a second one
        if self.state == S_TUNNEL:
            self.transport.write(data)
            self.deadline = self.loop.time() + self.limits.tunnel_timeout
            return
        resp = self.resp
        if resp is None:
            self._response_head(data, parsed)
            return
        self._wait_upstream()
        body_length = resp.body_length
        n = len(data)
        if body_length > 0:
            take = self.resp_left if self.resp_left < n else n
            self.transport.write(data if take == n else data[:take])
            self.bytes_out += take
            self.resp_left -= take
            if self.resp_left == 0:
                self._finish(take == n)
        elif body_length == CHUNKED:
            try:
                k = self.resp_scanner.feed(data)
            except ProtocolError as exc:
                self._upstream_broken(f"invalid chunked response body: {exc}")
                return
            self.transport.write(data if k == n else data[:k])
            self.bytes_out += k
            if self.resp_scanner.done:
                self._finish(k == n)
        else:  # UNTIL_CLOSE
            self.transport.write(data)
            self.bytes_out += n

    def _response_head(self, data: bytes, parsed=_UNPARSED) -> None:
        """Parse response heads from data (parsed: the first one, if the caller already parsed it)."""
        req = self.req
        if self.rbuf:
            self.rbuf += data
            data = bytes(self.rbuf)
            self.rbuf.clear()
            parsed = _UNPARSED
        pos = 0
        n = len(data)
        while True:
            if parsed is not _UNPARSED:
                resp, parsed = parsed, _UNPARSED
            else:
                try:
                    resp = parse_response(data, pos, self.limits.max_head_size, req.is_head)
                except ProtocolError as exc:
                    self._upstream_broken(f"invalid response head: {exc}", status=502)
                    return
            if resp is None:
                self.rbuf += data[pos:] if pos else data
                self._wait_upstream()
                return
            pos += resp.length
            if resp.status >= 200 or resp.status == 101:
                break
            self.interim += 1
            if self.interim > MAX_INTERIM_RESPONSES:
                self._upstream_broken(f"more than {MAX_INTERIM_RESPONSES} interim (1xx) responses")
                return
            if req.version:  # RFC 9110 section 15.2: no 1xx to an HTTP/1.0 client
                self.transport.write(build_response(resp, True, 1))
        if resp.status == 101:
            if req.upgrade is None:
                self._upstream_broken("101 for a request that asked no upgrade", status=502)
                return
            self.status_sent = 101
            self._record()  # the exchange ends here for the metrics; the tunnel lives on
            self._tunnel(resp, data[pos:])
            return
        self.resp = resp
        self.responded = True
        self.status_sent = resp.status
        keep = req.keep_alive and self.req_body_done and not self.server.draining
        body_length = resp.body_length
        if body_length == UNTIL_CLOSE:
            keep = False
        self.keep = keep
        out = build_response(resp, keep, req.version, self._timing() if self.server.server_timing else b"")
        self.bytes_out = len(out) + (n - pos if body_length < 0 else min(body_length, n - pos))
        if body_length == 0:
            self.transport.write(out)
            self._finish(pos == n)
        elif body_length > 0:
            take = min(body_length, n - pos)
            self.transport.write(out + data[pos : pos + take] if take else out)
            self.resp_left = body_length - take
            if self.resp_left == 0:
                self._finish(pos + take == n)
            else:
                self._wait_upstream()
        elif body_length == CHUNKED:
            self.resp_scanner = scanner = ChunkedScanner()
            try:
                k = scanner.feed(data, pos)
            except ProtocolError as exc:
                self.transport.write(out)
                self._upstream_broken(f"invalid chunked response body: {exc}")
                return
            self.transport.write(out + data[pos : pos + k])
            if scanner.done:
                self._finish(pos + k == n)
            else:
                self._wait_upstream()
        else:
            self.transport.write(out + data[pos:])
            self._wait_upstream()

    def _tunnel(self, resp, rest: bytes) -> None:
        """After a 101, both sides are bytes until either closes."""
        self._to("upgrade")
        self.resp = resp
        self.responded = True
        if self.lease is not None:
            self.lease.open_tunnel()  # an open tunnel keeps its service awake
        self.transport.write(build_response(resp, True, 1) + rest)
        if self.buf:
            self.upstream.transport.write(bytes(self.buf))
            self.buf.clear()
        self._resume(P_PIPELINE_FULL)
        self.body_deadline = 0.0
        self.deadline = self.loop.time() + self.limits.tunnel_timeout

    def _finish(self, clean: bool) -> None:
        """The response is complete: recycle the upstream, then serve the next request."""
        if self.req is not None:
            self._record()
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            if clean and self.resp is not None and self.resp.keep_alive and self.req_body_done:
                self.route.pool.give_back(conn)
            else:
                conn.close()
        self.resp = None
        self.resp_scanner = None
        self.req = None
        self.route = None
        self.body_deadline = 0.0
        lease = self.lease
        if lease is not None:
            self.lease = None
            lease.release()
        if not self.keep or self.server.draining or self.client_eof or not self.req_body_done:
            self.close()
            return
        self._to("respond")
        self.idle = True
        self.deadline = self.loop.time() + self.limits.keepalive_timeout
        if self.buf:
            self._after_response()

    def _after_response(self) -> None:
        """The response went out and requests were read ahead meanwhile (pipelining): go on with them."""
        self.t0 = perf_counter()
        data = bytes(self.buf)
        self.buf.clear()
        self._resume(P_PIPELINE_FULL)
        self._consume(data)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream closed or reset the connection of the exchange under way."""
        if conn is not self.upstream:
            return
        self.upstream = None
        if self.state == S_TUNNEL:
            self.close()
            return
        resp = self.resp
        if resp is not None:
            if resp.body_length == UNTIL_CLOSE:
                self._finish(False)
            else:
                log.warning("upstream for %s closed in the middle of a response", self.route.name)
                self.close()  # the client sees a short body: the truth
            return
        if (conn.reused and not self.retried and not self.rbuf and not self.interim
                and self.req.body_length == 0 and self.req.method in RETRY_METHODS):
            # A pooled connection the service had already closed, before any of the response came:
            # a request that is safe to repeat tries once more on a fresh one (RFC 9110 section 9.2.2).
            self.retried = True
            self._go_upstream()
            return
        self._count_upstream_error("reset")
        self._upstream_error(502, "upstream closed the connection")

    # ---- failures ----

    def _upstream_broken(self, why: str, status: int = 502) -> None:
        """The service sent something unusable."""
        log.warning("upstream for %s: %s", self.route.name if self.route else "?", why)
        self._count_upstream_error("bad_response")
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._upstream_error(status, why)

    def _upstream_error(self, status: int, why: str, retry_after: float = 0) -> None:
        """Answer the current request with status, if nothing of its response was sent."""
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if self.responded or self.state == S_CLOSED:
            self.close()
            return
        req = self.req
        keep = req.keep_alive and self.req_body_done and not self.server.draining
        out = error_response(status, keep, req.is_head, retry_after)
        self.transport.write(out)
        self.responded = True
        self.status_sent = status
        self.bytes_out = len(out)
        self.resp = None
        self.keep = keep
        self._finish(False)

    def _local_response(self, head, status: int, retry_after: float = 0, out: bytes | None = None) -> None:
        """Answer a request wakegate serves itself (out: a whole response made by the caller, which
        decided keep-alive the same way), keeping the connection if its framing allows."""
        keep = head.keep_alive and head.body_length == 0 and not self.server.draining
        if out is None:
            out = error_response(status, keep, head.is_head, retry_after)
        self.transport.write(out)
        if self.req is head:  # routed: the service answered for (no-wake, queue full, failed)
            self.status_sent = status
            self.bytes_out = len(out)
            self._record()
            self.req = None
            self.route = None
        else:
            self._count_client_error(status)
        if not keep:
            self.close()
        else:
            self.idle = True
            self.deadline = self.loop.time() + self.limits.keepalive_timeout

    def _reject(self, status: int, why: str) -> None:
        """A request we cannot read on from: answer (if nothing was sent yet) and close."""
        log.info("client %s: %d %s", self.client_addr.decode(), status, why)
        self._count_client_error(status)
        # Waiting for a head, nothing was sent for this request yet, whatever the last one did.
        if (self.state == S_HEAD or not self.responded) and self.state != S_CLOSED:
            out = error_response(status, False)
            self.transport.write(out)
            self.responded = True
            self.status_sent = status  # a routed request is recorded with it, not as 499
            self.bytes_out = len(out)
        self.close()

    # ---- measuring ----

    def _timing(self) -> bytes:
        """Server-Timing (W3C): where the time went before the response head, in ms."""
        upstream = (self.t_first - self.t_sent) * 1e3 if self.t_sent else 0.0
        return b"Server-Timing: queue;dur=%.3f, connect;dur=%.3f, upstream;dur=%.3f\r\n" % (
            self.queue_s * 1e3, self.connect_s * 1e3, upstream)

    def _record(self) -> None:
        """Count the exchange under way once: metrics, then the access log line."""
        req = self.req
        route = self.route
        if req is None or route is None:
            return
        server = self.server
        end = perf_counter()
        status = self.status_sent or 502
        total = end - self.t0 if self.t0 else 0.0
        upstream = self.t_first - self.t_sent if self.t_first and self.t_sent else 0.0
        if server.measure:
            stats = route.stats
            codes = stats.codes
            codes[status] = codes.get(status, 0) + 1
            stats.duration.observe(total)
            if upstream:
                stats.upstream.observe(upstream)
            if self.t_held:
                stats.queue.observe(self.queue_s)
            if self.connect_s:
                stats.connect.observe(self.connect_s)
        access = server.access_log
        if access is not None:
            access.append(end + access.wall_offset, route.name_bytes, req.method, req.target, status,
                          req.length + self.req_body_seen, self.bytes_out, total, self.queue_s, self.connect_s,
                          upstream, self.t_held != 0.0, self.client_addr)
        self.req = None

    def _count_client_error(self, status: int) -> None:
        reason = CLIENT_ERROR_REASONS.get(status, str(status))
        errors = self.server.stats.client_errors
        errors[reason] = errors.get(reason, 0) + 1

    def _count_upstream_error(self, reason: str) -> None:
        if self.route is not None:
            errors = self.route.stats.upstream_errors
            errors[reason] = errors.get(reason, 0) + 1

    # ---- deadlines (swept by the server's ticker) ----

    def on_body_deadline(self) -> None:
        """The client stopped sending its request body (or sends it too slowly)."""
        self.body_deadline = 0.0
        if self.state == S_CLOSED or self.req_body_done:
            return
        why = "request body too slow"
        if self.state == S_HELD:
            why += " while the service woke"
        if self.resp is None:
            self._reject(408, why)
        else:
            self.close()  # the response is already under way: it cannot become a 408

    def on_deadline(self) -> None:
        state = self.state
        if state == S_HEAD:
            if self.buf:
                self._reject(408, "request head too slow")
            else:
                self.close()  # idle keep-alive connection
        elif state == S_CONNECTING:
            if self.connect_task is not None:
                self.connect_task.cancel()
                self.connect_task = None
            self.waiting_for_pool = False
            self._count_upstream_error("connect_timeout")
            self._upstream_error(504, "upstream connect timed out")
        elif state == S_HELD and self.route is not None and self.route.wait_page_after is not None:
            lease, self.lease = self.lease, None  # the wake goes on; this browser gets a page that waits
            if lease is not None:
                lease.release()
            head = self.req
            keep = head.keep_alive and not self.server.draining
            self._to("respond")
            self._local_response(head, 503, out=waiting_page(self.route.name, keep))
        elif state == S_EXCHANGE:
            if self.write_paused and self.responded:
                log.info("client %s reads too slowly; closing", self.client_addr.decode())
                self.close()
            else:
                self._count_upstream_error("timeout")
                self._upstream_error(504, "upstream timed out")
        else:
            self.close()

    def drain(self) -> None:
        """Shutting down: idle connections close now, busy ones after their response."""
        if self.state == S_HEAD and not self.buf:
            self.close()

    # ---- the end: one teardown, whoever ends the connection ----

    def _teardown(self) -> bool:
        """Record an unfinished exchange, give back everything it held; False if already done."""
        if self.state == S_CLOSED:
            return False
        if self.req is not None and self.route is not None:
            if not self.status_sent:
                self.status_sent = 499  # nginx's code: the client went away first
            self._record()
        self._to("close")
        self.deadline = 0.0
        self.body_deadline = 0.0
        self.waiting_for_pool = False
        self.server.connections.discard(self)
        lease = self.lease
        if lease is not None:
            self.lease = None
            lease.release()
        if self.upstream is not None:
            self.upstream.abort()  # its exchange was not finished; never reuse it
            self.upstream = None
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self.pending.clear()
        self.pending_size = 0
        self.buf.clear()
        return True

    def close(self) -> None:
        if self._teardown():
            self.transport.close()

    def abort(self) -> None:
        self._teardown()
        self.transport.abort()
