"""Readiness: a service is ready when a GET on its ready path gets any status below 500.

A TCP accept alone never counts (user-mode networking and some runtimes accept
long before the application answers). Attempts are short and retried with a
backoff that starts at about a millisecond, so the probe adds little to the
real wake time.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.http11 import CHUNKED, UNTIL_CLOSE, ChunkedScanner, ProtocolError, parse_response

RETRY_FIRST = 0.001  # first pause between attempts, seconds
RETRY_MAX = 0.004  # pauses double up to this: a ready service waits at most ~4 ms for us to notice
ATTEMPT_FIRST = 0.1  # first per-attempt timeout: a stalled connect is abandoned quickly
ATTEMPT_MAX = 1.0  # per-attempt timeouts grow by half up to this
MAX_PROBE_HEAD = 16 * 1024


class NotReady(Exception):
    """The service did not answer its readiness probe in time (``timed_out``), or died trying."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class _Probe(asyncio.Protocol):
    """Sends one GET and resolves with the response status."""

    def __init__(self, request: bytes, result: asyncio.Future) -> None:
        self.request = request
        self.result = result
        self.buf = bytearray()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            head = parse_response(self.buf, 0, MAX_PROBE_HEAD)
        except ProtocolError as exc:
            self._done(exc)
            return
        while head is not None and head.status < 200:  # skip interim responses
            self.buf = self.buf[head.length :]
            try:
                head = parse_response(self.buf, 0, MAX_PROBE_HEAD)
            except ProtocolError as exc:
                self._done(exc)
                return
        if head is not None:
            self._done(head.status)

    def connection_lost(self, exc) -> None:
        self._done(ConnectionError("closed before answering"))

    def _done(self, outcome) -> None:
        if not self.result.done():
            if isinstance(outcome, BaseException):
                self.result.set_exception(outcome)
            else:
                self.result.set_result(outcome)
        if self.transport is not None:
            self.transport.close()


async def probe_once(host: str, port: int, path: str, timeout: float) -> int:
    """One GET; the status, or an exception (timeout, refused, not HTTP)."""
    loop = asyncio.get_running_loop()
    result = loop.create_future()
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: wakegate-ready\r\nConnection: close\r\n\r\n".encode()
    transport = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: _Probe(request, result), host, port)
            return await result
    finally:
        if transport is not None:
            transport.close()


class _PooledProbe:
    """Owns a pooled upstream connection for one probe (the proxy's exchange interface)."""

    def __init__(self, conn, result: asyncio.Future) -> None:
        self.conn = conn
        self.result = result
        self.buf = b""
        self.head = None
        self.left = 0
        self.scanner = None

    def upstream_data(self, data: bytes) -> None:
        try:
            if self.head is None:
                self.buf += data
                head = parse_response(self.buf, 0, MAX_PROBE_HEAD)
                if head is None:
                    return
                self.head = head
                data = self.buf[head.length :]
                if head.body_length == CHUNKED:
                    self.scanner = ChunkedScanner()
                elif head.body_length == UNTIL_CLOSE:
                    self._finish(reuse=False)
                    return
                else:
                    self.left = head.body_length
            if self.scanner is not None:
                self.scanner.feed(data)
                if self.scanner.done:
                    self._finish(reuse=True)
            else:
                self.left -= len(data)
                if self.left <= 0:
                    self._finish(reuse=self.left == 0 and self.head.keep_alive)
        except ProtocolError as exc:
            self.conn.abort()
            self._settle(exc)

    def _finish(self, reuse: bool) -> None:
        conn = self.conn
        if reuse and self.head.keep_alive:
            conn.pool.give_back(conn)
        else:
            conn.close()
        self._settle(self.head.status)

    def _settle(self, outcome) -> None:
        if not self.result.done():
            if isinstance(outcome, BaseException):
                self.result.set_exception(outcome)
            else:
                self.result.set_result(outcome)

    def upstream_lost(self, conn) -> None:
        self._settle(ConnectionError("closed before answering"))

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass


async def probe_pooled(pool, host: str, path: str, timeout: float) -> int | None:
    """Probe over an idle pooled connection (no handshake, no accept); None if there is none."""
    conn = pool.take()
    if conn is None:
        return None
    result = asyncio.get_running_loop().create_future()
    conn.owner = _PooledProbe(conn, result)
    conn.transport.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wakegate-ready\r\n\r\n".encode())
    try:
        async with asyncio.timeout(timeout):
            return await result
    except BaseException:
        conn.abort()
        raise


async def probe_until_ready(host: str, port: int, path: str, deadline: float, exited: asyncio.Future | None = None,
                            first_attempt: float = ATTEMPT_FIRST) -> int:
    """Probe until a status below 500 (returned), the deadline, or the process exits (NotReady)."""
    pause = RETRY_FIRST
    attempt_timeout = first_attempt
    last = "no attempt"
    while True:
        if exited is not None and exited.done():
            raise NotReady(f"process exited with status {exited.result()} before it was ready")
        left = deadline - time.monotonic()
        if left <= 0:
            raise NotReady(f"not ready before the deadline (last: {last})", timed_out=True)
        try:
            status = await probe_once(host, port, path, min(attempt_timeout, left))
            if status < 500:
                return status
            last = f"status {status}"
        except (OSError, TimeoutError, asyncio.TimeoutError, ProtocolError) as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                attempt_timeout = min(attempt_timeout * 1.5, ATTEMPT_MAX)
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, RETRY_MAX)


async def warm_up(name: str, host: str, port: int, paths) -> None:
    """GET each warm-up path once (a prepared snapshot then holds what they touched); a failure is
    logged, never fatal."""
    log = logging.getLogger("wakegate.backend")
    for path in paths:
        try:
            status = await probe_once(host, port, path, ATTEMPT_MAX * 5)
            log.info("service %s: warm-up GET %s: %d", name, path, status)
        except Exception as exc:
            log.warning("service %s: warm-up GET %s failed: %s", name, path, exc)
