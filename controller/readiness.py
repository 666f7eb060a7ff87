"""Readiness: a service is ready when a GET on its ready path gets any status below 500.

A TCP accept alone never counts (user-mode networking and some runtimes accept
long before the application answers). Attempts are short and retried with a
backoff that starts at about a millisecond, so the probe adds little to the
real wake time.
"""

from __future__ import annotations

import asyncio
import time

from proxy.http11 import ProtocolError, parse_response

RETRY_FIRST = 0.001  # first pause between attempts, seconds
RETRY_MAX = 0.05  # pauses double up to this
ATTEMPT_FIRST = 0.1  # first per-attempt timeout: a stalled connect is abandoned quickly
ATTEMPT_MAX = 1.0  # per-attempt timeouts grow by half up to this
MAX_PROBE_HEAD = 16 * 1024


class NotReady(Exception):
    """The service did not answer its readiness probe in time (or died trying)."""


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


async def probe_until_ready(host: str, port: int, path: str, deadline: float, exited: asyncio.Future | None = None) -> int:
    """Probe until a status below 500 (returned), the deadline, or the process exits (NotReady)."""
    pause = RETRY_FIRST
    attempt_timeout = ATTEMPT_FIRST
    last = "no attempt"
    while True:
        if exited is not None and exited.done():
            raise NotReady(f"process exited with status {exited.result()} before it was ready")
        left = deadline - time.monotonic()
        if left <= 0:
            raise NotReady(f"not ready before the deadline (last: {last})")
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
