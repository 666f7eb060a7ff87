"""A small QMP client (QEMU Machine Protocol: JSON lines over a Unix socket), asyncio, with a
timeout on every call, so a VMM that hangs is detected instead of waited on forever.

Our own rather than qemu.qmp: wakegate needs a handful of commands (stop, cont,
migrate, query-migrate, query-status, quit), each bounded in time, on the event
loop it already runs; qemu.qmp adds a dependency and a protocol layer for far more.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import socket

import orjson

QMP_TIMEOUT = 5.0  # per command; QMP answers in milliseconds unless the VMM is stuck
EVENTS_KEPT = 64  # the most recent asynchronous events (STOP, RESUME, ...) kept for inspection


class QMPError(Exception):
    """QEMU answered with an error, or did not answer in time."""


class QMP:
    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.events: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, path: str, timeout: float = QMP_TIMEOUT) -> "QMP":
        """Connect (retrying until QEMU has made the socket) and negotiate capabilities."""
        qmp = cls()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                qmp.reader, qmp.writer = await asyncio.open_unix_connection(path, limit=1 << 20)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise QMPError(f"no QMP socket at {path} after {timeout}s") from None
                await asyncio.sleep(0.005)
        await qmp._negotiate_or_close(deadline - loop.time())
        return qmp

    @classmethod
    async def from_socket(cls, sock: socket.socket, timeout: float = QMP_TIMEOUT) -> "QMP":
        """Speak QMP over a connected socket, e.g. our end of a socketpair whose other end QEMU got
        with ``-chardev socket,fd=N``: no socket file, no connect retries."""
        qmp = cls()
        qmp.reader, qmp.writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        await qmp._negotiate_or_close(timeout)
        return qmp

    async def _negotiate_or_close(self, timeout: float) -> None:
        """Negotiate; a peer that fails it does not keep our socket open."""
        try:
            await self._negotiate(timeout)
        except BaseException:
            self.writer.close()
            raise

    async def _negotiate(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        greeting = await self._read(timeout)
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        await self.execute("qmp_capabilities", timeout=max(deadline - loop.time(), 0.001))

    async def _read(self, timeout: float) -> dict:
        try:
            line = await asyncio.wait_for(self.reader.readline(), max(timeout, 0.001))
        except asyncio.TimeoutError:
            raise QMPError(f"QEMU did not answer within {timeout:.1f}s") from None
        except ConnectionError:
            raise QMPError("QEMU closed the QMP connection") from None
        if not line:
            raise QMPError("QEMU closed the QMP connection")
        return orjson.loads(line)

    async def execute(self, command: str, arguments: dict | None = None, timeout: float = QMP_TIMEOUT):
        """Run one command; its "return" value, or QMPError."""
        ident = next(self._ids)
        message = {"execute": command, "id": ident}
        if arguments:
            message["arguments"] = arguments
        try:
            self.writer.write(orjson.dumps(message) + b"\n")
        except ConnectionError:
            raise QMPError("QEMU closed the QMP connection") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            reply = await self._read(deadline - loop.time())
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != ident:
                continue
            if "error" in reply:
                raise QMPError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    async def quit(self, timeout: float = QMP_TIMEOUT) -> None:
        """Ask QEMU to exit; it may close the socket before (or instead of) answering."""
        try:
            await self.execute("quit", timeout=timeout)
        except QMPError as exc:
            if "closed" not in str(exc):
                raise
        await self.close()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
