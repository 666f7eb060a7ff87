"""What the data path records per request, cheaply: counters, fixed-bucket histograms,
and the access log. Exposition (Prometheus text) is the controller's job, at scrape time.

Recording a request adds to C histograms and status counts (proxy/_warm.c; twins in
proxy/_native.py); the access log (proxy/_access.c) formats its JSON line into a batch that goes
every 100 ms to a writer thread, which does the disk I/O, so the event loop never blocks on it.
"""

from __future__ import annotations

import logging
import os
import select
import stat
import sys
import time

from .warm import ACCESS_FLUSH_BYTES, BUCKETS, AccessLogBase, Histogram, StatusCounts  # noqa: F401

log = logging.getLogger("wakegate.metrics")

ACCESS_FLUSH_SECONDS = 0.1  # access log lines wait at most this long for the writer thread
ACCESS_MAX_PENDING = 100_000  # lines waiting for a slow disk beyond this are dropped (and counted)
# A log reader that stops reading (a stalled journald or pipe) must not hold up a shutdown or a
# reload: close() waits this long for the queued lines, then drops what is left (and counts it).
# The default drain is 30 s and systemd's stop timeout 90 s; a healthy disk needs milliseconds.
ACCESS_CLOSE_SECONDS = 5.0


class WasmStats:
    """A wasm service's handler phases and failures (proxy/wasm.py)."""

    __slots__ = ("instantiate", "run", "write", "errors")
    PHASES = ("instantiate", "run", "write")

    def __init__(self) -> None:
        self.instantiate = Histogram()  # a fresh store and instance
        self.run = Histogram()  # _start, until the module exits
        self.write = Histogram()  # the module's end to the response's last byte sent
        self.errors: dict[str, int] = {}  # trap, time, memory, response_size, malformed, exit, module

    def export(self) -> dict:
        out = {"errors": dict(self.errors)}
        for phase in self.PHASES:
            hist = getattr(self, phase)
            out[phase] = [hist.counts, hist.sum]
        return out

    def absorb(self, exported: dict) -> None:
        _add_counts(self.errors, exported["errors"])
        for phase in self.PHASES:
            getattr(self, phase).absorb(*exported[phase])


class ServiceStats:
    """Per-service request metrics, written by the data path only."""

    __slots__ = ("codes", "duration", "queue", "upstream", "connect", "upstream_errors", "wasm")

    def __init__(self) -> None:
        self.codes = StatusCounts()  # status -> requests (a dict, or its C twin that the warm path counts in)
        self.duration = Histogram()  # first byte of the head to the last byte of the response
        self.queue = Histogram()  # held for a wake
        self.upstream = Histogram()  # head sent to first response byte
        self.connect = Histogram()  # new upstream connections only
        self.upstream_errors: dict[str, int] = {}
        self.wasm: WasmStats | None = None  # a wasm service's handler phases

    HISTOGRAMS = ("duration", "queue", "upstream", "connect")

    def export(self) -> dict:
        """What a worker process sends the controller at scrape time (JSON-able)."""
        out = {"codes": {str(code): n for code, n in self.codes.items()}, "upstream_errors": dict(self.upstream_errors)}
        for name in self.HISTOGRAMS:
            hist = getattr(self, name)
            out[name] = [hist.counts, hist.sum]
        if self.wasm is not None:
            out["wasm"] = self.wasm.export()
        return out

    def absorb(self, exported: dict) -> None:
        """Add a worker's export() to this one: counters summed, histograms merged bucket by bucket."""
        codes = self.codes
        for code, n in exported["codes"].items():
            codes[int(code)] = codes.get(int(code), 0) + n
        _add_counts(self.upstream_errors, exported["upstream_errors"])
        for name in self.HISTOGRAMS:
            getattr(self, name).absorb(*exported[name])
        if "wasm" in exported:
            if self.wasm is None:
                self.wasm = WasmStats()
            self.wasm.absorb(exported["wasm"])


def _add_counts(into: dict, more: dict) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


class ProxyStats:
    """Errors that belong to no service (the request never got that far)."""

    __slots__ = ("client_errors", "access_dropped", "accept_errors")

    def __init__(self) -> None:
        self.client_errors: dict[str, int] = {}
        self.access_dropped = 0
        self.accept_errors: dict[str, int] = {}  # fd_limit, admin_limit

    def export(self) -> dict:
        return {"client_errors": dict(self.client_errors), "access_dropped": self.access_dropped,
                "accept_errors": dict(self.accept_errors)}

    def absorb(self, exported: dict) -> None:
        _add_counts(self.client_errors, exported["client_errors"])
        self.access_dropped += exported["access_dropped"]
        _add_counts(self.accept_errors, exported["accept_errors"])


CLIENT_ERROR_REASONS = {
    400: "bad_request",
    404: "unknown_host",
    408: "timeout",
    413: "body_too_large",
    421: "unknown_host",
    431: "head_too_large",
    501: "not_implemented",
    505: "version_not_supported",
}


# One access log line; milliseconds with three decimals, the time with microseconds.
_ACCESS_LINE = (
    b'{"time":%.6f,"service":%s,"method":"%s","path":"%s","status":%d,"bytes_in":%d,"bytes_out":%d,'
    b'"ms":{"total":%.3f,"queue":%.3f,"connect":%.3f,"upstream":%.3f},"woke":%s,"client":"%s"}\n'
)


class AccessLog(AccessLogBase):
    """One JSON line per request to a file or stdout, written by a thread, never by the loop.

    The data path appends each line with ``append()`` (AccessLogBase: proxy/_access.c, whose writer
    thread needs no GIL, or its twin); the lines go to the writer past ACCESS_FLUSH_BYTES or every
    ACCESS_FLUSH_SECONDS. callgrind counted ~14,700 instructions per line for a dict through orjson,
    ~5,800 for the line formatted in C and handed to a Python thread; see README's Performance.
    """

    def __init__(self, target: str, loop, stats: ProxyStats) -> None:
        super().__init__()
        self.target = target
        self.loop = loop
        self.stats = stats
        if target == "-":
            self.fd = sys.stdout.fileno()
        else:
            try:
                self.fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OSError(f"access log {target}: {exc.strerror or exc}") from None
        # Every worker process appends to the same file: each write() carries whole lines, and
        # O_APPEND makes each one land in one piece at the end (nginx's workers share a log so). A
        # pipe keeps a write whole only up to PIPE_BUF bytes, so there writes are cut at lines.
        piece = 0 if stat.S_ISREG(os.fstat(self.fd).st_mode) else select.PIPE_BUF
        # monotonic -> wall clock, taken once: a request costs no time.time() call
        self._open(self.fd, piece, time.time() - time.perf_counter(), ACCESS_MAX_PENDING)
        self._timer = loop.call_later(ACCESS_FLUSH_SECONDS, self._flush)

    def _flush(self) -> None:
        self._timer = self.loop.call_later(ACCESS_FLUSH_SECONDS, self._flush)
        self.flush()
        if self.trouble:
            self._account()

    def _account(self) -> None:
        """Count the lines dropped for a writer too far behind, and say which writes failed."""
        self.stats.access_dropped += self.take_dropped()
        failed, errno = self.take_errors()
        if failed:
            log.warning("access log %s: %d writes failed: %s", self.target, failed, os.strerror(errno))

    def close(self) -> None:
        self._timer.cancel()
        super().close(ACCESS_CLOSE_SECONDS)
        dropped = self.take_dropped()
        if dropped:
            self.stats.access_dropped += dropped
            log.warning("access log %s: %d lines dropped: the reader fell behind or stopped taking them",
                        self.target, dropped)
        self._account()
        if self.target != "-":
            os.close(self.fd)
