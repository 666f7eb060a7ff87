"""WebAssembly services: every request runs in a fresh instance of the service's WASI module, with
the CGI-style contract WAGI defined: request line and headers as environment variables, the body on
stdin, and on stdout a CGI response (``Status:`` and other headers, a blank line, the body).

Each proxy process answers its wasm services itself, on a loopback listener of its own that their
routes point at, so routing, limits, metrics, the access log and Server-Timing are the same as for
any other service. Instances run off the event loop in a bounded thread pool per service (wasmtime
runs wasm without the GIL), so a slow handler never holds up other requests. Limits per request:
linear memory (the store's limit), time (epoch interruption, ticked by one thread per process), the
response size (counted as the module writes), and the request body (read before the instance
starts). A handler that traps, breaks a limit, exits without a response or writes a malformed one
gets a 502 and one log line, and touches nothing else. Modules are compiled once and kept compiled on
disk, keyed by the module's SHA-256 and wasmtime's version; a module replaced on disk is noticed at
the next request and compiled again.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from time import perf_counter

from .http11 import CHUNKED, ProtocolError, parse_request
from .metrics import WasmStats
from .routing import Router

log = logging.getLogger("wakegate.wasm")

EPOCH_TICK = 0.005  # seconds per epoch: max_time is enforced to this resolution
MAX_CGI_HEAD = 16 * 1024  # a handler's header block; as the proxy's own MAX_HEAD_BYTES
# Output held back before the head goes out (or all of it, when max_response is smaller): such
# answers carry Content-Length, and a handler that breaks a limit within it still gets a clean 502.
STREAM_AFTER = 1024 * 1024
LINGER_SECONDS = 5.0  # after an early answer (413), the unread body is read and dropped this long, so the
                      # close does not reset the connection before the proxy reads the answer (nginx: lingering_time)
MAX_STDERR_KEPT = 2048  # of a failing handler's stderr, the part that goes in the log line
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te", b"trailer", b"upgrade",
               b"status", b"proxy-connection"}


class HandlerError(Exception):
    """Why a handler's request failed (reason: trap, time, memory, response_size, malformed, exit, module,
    body_size) and its answer: 502, or 413 for a body over max_body."""

    def __init__(self, reason: str, detail: str, status: int = 502) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status


class _Runtime:
    """The process's wasmtime engine (with epoch interruption), its WASI linker and the epoch ticker."""

    _instance: "_Runtime | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import wasmtime

        self.wasmtime = wasmtime
        config = wasmtime.Config()
        config.epoch_interruption = True
        self.engine = wasmtime.Engine(config)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        self.version = importlib.metadata.version("wasmtime")
        self._ticker = threading.Thread(target=self._tick, name="wakegate-wasm-epoch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while True:
            time.sleep(EPOCH_TICK)
            self.engine.increment_epoch()

    @classmethod
    def get(cls) -> "_Runtime":
        with cls._lock:
            if cls._instance is None:
                cls._instance = _Runtime()
            return cls._instance


def compiled(runtime: _Runtime, module_path: str, cache_dir: str):
    """The module, from the on-disk cache when it holds this exact module compiled by this wasmtime."""
    with open(module_path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    cached = os.path.join(cache_dir, f"{digest}-wasmtime-{runtime.version}.cwasm")
    wasmtime = runtime.wasmtime
    if os.path.exists(cached):
        try:
            return wasmtime.Module.deserialize_file(runtime.engine, cached), False
        except wasmtime.WasmtimeError as exc:  # truncated or foreign: compile again
            log.warning("wasm: cached %s unusable (%s); compiling again", cached, exc)
    module = wasmtime.Module(runtime.engine, data)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False, suffix=".tmp") as out:
            out.write(module.serialize())
        os.replace(out.name, cached)  # whole or not at all, for another process reading it
    except OSError as exc:
        log.warning("wasm: cannot keep the compiled module in %s: %s", cache_dir, exc)
    return module, True


class WasmService:
    """One wasm service in one process: its module (compiled lazily), its pool and its limits."""

    def __init__(self, name: str, cfg, prefix: str = "") -> None:
        self.name = name
        self.cfg = cfg
        self.prefix = prefix
        self.stats = WasmStats()  # the route's ServiceStats.wasm once routed (proxy/worker.py)
        self.pool: ThreadPoolExecutor | None = None
        self._module = None
        self._module_key = None  # (inode, size, mtime) of the file compiled
        self._lock = threading.Lock()

    def _current_module(self, runtime: _Runtime):
        st = os.stat(self.cfg.module)
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key != self._module_key:
                started = perf_counter()
                self._module, fresh = compiled(runtime, self.cfg.module, self.cfg.cache_dir)
                self._module_key = key
                log.info("wasm service %s: %s %s in %.1f ms", self.name, "compiled" if fresh else "loaded",
                         self.cfg.module, (perf_counter() - started) * 1e3)
            return self._module

    def submit(self, env: list, stdin: str | None, out) -> "asyncio.Future":
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=self.cfg.instances, thread_name_prefix=f"wasm-{self.name}")
        return asyncio.wrap_future(self.pool.submit(self.run, env, stdin, out))

    def run(self, env: list, stdin: str | None, out) -> tuple[float, float]:
        """In a pool thread: one request in a fresh instance. out(bytes) -> False once over the limit.
        Returns (instantiate, run) seconds or raises HandlerError."""
        runtime = _Runtime.get()
        wasmtime = runtime.wasmtime
        cfg = self.cfg
        try:
            module = self._current_module(runtime)
        except (OSError, wasmtime.WasmtimeError) as exc:
            raise HandlerError("module", f"module {cfg.module}: {exc}") from None
        started = perf_counter()
        store = wasmtime.Store(runtime.engine)
        store.set_limits(memory_size=cfg.max_memory)
        store.set_epoch_deadline(max(1, round(cfg.max_time / EPOCH_TICK)))
        wasi = wasmtime.WasiConfig()
        wasi.argv = [os.path.basename(cfg.module)]
        wasi.env = env
        over = []
        stderr = bytearray()

        def write(data: bytes) -> int:
            if over or not out(data):
                over.append(True)
                return -1  # the module sees a write error
            return len(data)

        def keep_stderr(data: bytes) -> int:
            if len(stderr) < MAX_STDERR_KEPT:
                stderr.extend(data[:MAX_STDERR_KEPT - len(stderr)])
            return len(data)

        wasi.stdout_custom = write
        wasi.stderr_custom = keep_stderr
        for guest, host, writable in cfg.dirs:
            wasi.preopen_dir(host, guest, writable)
        if stdin is not None:
            wasi.stdin_file = stdin  # the read end of the pipe the body streams into
        store.set_wasi(wasi)
        instance = runtime.linker.instantiate(store, module)
        instantiated = perf_counter()
        start = instance.exports(store).get("_start")
        if start is None:
            raise HandlerError("malformed", "the module exports no _start (build it as a WASI command)")
        code = 0
        try:
            start(store)
        except wasmtime.ExitTrap as exc:
            code = exc.code
        except wasmtime.Trap as exc:
            raise self._trap(exc, stderr) from None
        except wasmtime.WasmtimeError as exc:
            raise self._trap(exc, stderr) from None
        finished = perf_counter()
        if over:
            raise HandlerError("response_size", f"wrote more than max_response ({cfg.max_response} bytes)")
        if code != 0:
            raise HandlerError("exit", f"exited with status {code}{_said(stderr)}")
        return instantiated - started, finished - instantiated

    def _trap(self, exc, stderr: bytes) -> HandlerError:
        text = str(exc)
        if "epoch" in text or "interrupt" in text:
            return HandlerError("time", f"ran longer than max_time ({self.cfg.max_time:g}s)")
        cause = [line.strip() for line in text.splitlines() if line.strip()][-1]  # wasmtime's "Caused by" line
        if b"out of memory" in bytes(stderr):
            return HandlerError("memory", f"ran out of max_memory ({self.cfg.max_memory} bytes): {cause}{_said(stderr)}")
        return HandlerError("trap", f"trapped: {cause}{_said(stderr)}")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _said(stderr: bytes) -> str:
    text = bytes(stderr).decode("utf-8", "replace").strip()
    return f"; stderr: {text[-300:]}" if text else ""


def cgi_environment(head, body_length: int, prefix: str, client: str, env: tuple) -> list:
    """The CGI meta-variables of one request (RFC 3875, as WAGI sets them), then the module's own."""
    path, _, query = head.target.partition(b"?")
    script = prefix.rstrip("/")
    out = [
        ("REQUEST_METHOD", head.method.decode("latin-1")),
        ("SERVER_PROTOCOL", f"HTTP/1.{head.version}"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_SOFTWARE", "wakegate"),
        ("SCRIPT_NAME", script),
        ("PATH_INFO", path.decode("latin-1")[len(script):] or "/"),
        ("QUERY_STRING", query.decode("latin-1")),
        ("X_FULL_URL", head.target.decode("latin-1")),
        ("REMOTE_ADDR", client),
        ("SERVER_NAME", (head.host or b"").decode("latin-1").rsplit(":", 1)[0]),
        ("CONTENT_LENGTH", str(body_length) if body_length else ""),
    ]
    for name, value in head.headers:
        key = name.decode("latin-1").upper().replace("-", "_")
        if key == "CONTENT_TYPE":
            out.append(("CONTENT_TYPE", value.decode("latin-1")))
        elif key not in ("CONTENT_LENGTH", "PROXY"):  # HTTP_PROXY: httpoxy
            out.append(("HTTP_" + key, value.decode("latin-1")))
    return out + list(env)


class CgiResponse:
    """A handler's stdout as it comes: the CGI header block, then the body (sans-io)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False

    def feed(self, data: bytes) -> bytes:
        """Body bytes available after this data (b"" while the header block is incomplete)."""
        if self.head_done:
            return data
        self.buf += data
        end, sep = self.buf.find(b"\r\n\r\n"), 4
        lf = self.buf.find(b"\n\n")
        if lf >= 0 and (end < 0 or lf < end):
            end, sep = lf, 2
        if end < 0:
            if len(self.buf) > MAX_CGI_HEAD:
                raise HandlerError("malformed", f"no end of the CGI header block in {MAX_CGI_HEAD} bytes")
            return b""
        self._parse(bytes(self.buf[:end]))
        rest = bytes(self.buf[end + sep:])
        self.buf = bytearray()
        self.head_done = True
        return rest

    def _parse(self, block: bytes) -> None:
        location = False
        for line in block.replace(b"\r\n", b"\n").split(b"\n"):
            name, colon, value = line.partition(b":")
            name, value = name.strip(), value.strip()
            if not colon or not _TOKEN.match(name) or any(c in value for c in b"\r\n\0"):
                raise HandlerError("malformed", f"bad CGI header line {line[:60]!r}")
            lower = name.lower()
            if lower == b"status":
                m = re.match(rb"^([1-5][0-9][0-9])(?: .*)?$", value)
                if not m or int(m.group(1)) < 200:
                    raise HandlerError("malformed", f"bad Status {value[:40]!r}")
                self.status = int(m.group(1))
            elif lower not in _HOP_BY_HOP:
                location |= lower == b"location"
                self.headers.append((name, value))
        if not self.status:
            self.status = 302 if location else 200
        if not self.headers and not location and self.status == 200 and not block:
            raise HandlerError("malformed", "an empty CGI header block")


def http_head(status: int, headers: list, length: int | None, extra: bytes = b"") -> bytes:
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:  # a status the handler made up (299, 599 ...)
        reason = b"Status"
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    lines.append(b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n")
    return b"".join(lines) + extra + b"\r\n"


class _Exchange:
    """One request's trip through a handler, between the pool thread and the event loop."""

    __slots__ = ("conn", "service", "is_head", "cgi", "held", "streaming", "failed", "sent")

    def __init__(self, conn, service: WasmService, is_head: bool) -> None:
        self.conn = conn
        self.service = service
        self.is_head = is_head
        self.cgi = CgiResponse()
        self.held = bytearray()  # body bytes not sent yet
        self.streaming = False
        self.failed: HandlerError | None = None
        self.sent = 0

    def output(self, data: bytes) -> bool:
        """In the pool thread: the module wrote data. False once it passed max_response."""
        self.sent += len(data)
        if self.sent > self.service.cfg.max_response:
            return False
        self.conn.loop.call_soon_threadsafe(self.take, bytes(data))
        return True

    def take(self, data: bytes) -> None:
        if self.failed is not None or self.conn.transport is None:
            return
        try:
            body = self.cgi.feed(data)
        except HandlerError as exc:
            self.failed = exc
            return
        if not self.cgi.head_done:
            return
        self.held += body
        if not self.streaming and len(self.held) > min(STREAM_AFTER, self.service.cfg.max_response):
            self.streaming = True
            self.conn.write(http_head(self.cgi.status, self.cgi.headers, None))
        if self.streaming and self.held and not self.is_head:
            self.conn.write(b"%x\r\n%s\r\n" % (len(self.held), bytes(self.held)))
            self.held.clear()

    def finish(self, instantiate: float, run: float) -> None:
        """The module exited: the response goes out (whole, with Content-Length, when it is small)."""
        if self.failed is not None:
            raise self.failed
        if not self.cgi.head_done:
            raise HandlerError("malformed", "no CGI header block (a blank line ends it)")
        timing = b"Server-Timing: wasm-instantiate;dur=%.3f, wasm-run;dur=%.3f\r\n" % (instantiate * 1e3, run * 1e3)
        if self.streaming:
            tail = b"" if self.is_head else (b"%x\r\n%s\r\n" % (len(self.held), bytes(self.held)) if self.held else b"")
            self.conn.write(tail + b"0\r\n\r\n")
        else:
            self.conn.write(http_head(self.cgi.status, self.cgi.headers, len(self.held), timing)
                            + (b"" if self.is_head else bytes(self.held)))


class BodyDecoder:
    """A request body as it arrives, framed by Content-Length or chunked (sans-io): feed() returns the
    body bytes in data and whether the body ended; bytes past its end are kept in ``rest``."""

    def __init__(self, length: int) -> None:
        self.chunked = length == CHUNKED
        self.left = 0 if self.chunked else length  # bytes of the current chunk (or of the body) to come
        self.state = "size" if self.chunked else "data"
        self.line = bytearray()
        self.rest = b""
        self.done = not self.chunked and length == 0

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        pos = 0
        n = len(data)
        while pos < n and not self.done:
            if self.state == "data":
                take = min(self.left, n - pos)
                out += data[pos:pos + take]
                pos += take
                self.left -= take
                if self.left == 0:
                    if self.chunked:
                        self.state = "crlf"
                    else:
                        self.done = True
            else:  # a line: chunk size, the CRLF after a chunk, or a trailer line
                end = data.find(b"\n", pos)
                if end < 0:
                    self.line += data[pos:]
                    pos = n
                    if len(self.line) > MAX_CGI_HEAD:
                        raise HandlerError("body", "a chunk line too long", 400)
                    break
                self.line += data[pos:end]
                pos = end + 1
                line = bytes(self.line).rstrip(b"\r")
                self.line.clear()
                if self.state == "size":
                    try:
                        self.left = int(line.split(b";")[0].strip(), 16)
                    except ValueError:
                        raise HandlerError("body", f"bad chunk size {line[:20]!r}", 400) from None
                    self.state = "data" if self.left else "trailer"
                elif self.state == "crlf":
                    self.state = "size"
                elif not line:  # the blank line after the trailers
                    self.done = True
        self.rest = data[pos:]
        return bytes(out)


class _StdinFeed:
    """Request body bytes into a pipe the instance reads as stdin, as they arrive (backpressure: the
    pipe's buffer; a guest that stops reading stops us writing, and what it never reads is dropped)."""

    def __init__(self, loop, limit: int) -> None:
        self.loop = loop
        self.limit = limit
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.write_fd, False)
        self.pending = bytearray()
        self.total = 0
        self.ended = False
        self.too_large = False
        self._writing = False

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.read_fd}"

    def write(self, data: bytes) -> None:
        if self.write_fd < 0 or not data:
            return
        self.total += len(data)
        if self.total > self.limit:
            self.too_large = True
            self.end()
            return
        self.pending += data
        self._flush()

    def _flush(self) -> None:
        while self.pending and self.write_fd >= 0:
            try:
                sent = os.write(self.write_fd, self.pending)
            except BlockingIOError:
                if not self._writing:
                    self._writing = True
                    self.loop.add_writer(self.write_fd, self._flush)
                return
            except (BrokenPipeError, OSError):  # the guest is done with stdin: drop the rest
                self.pending.clear()
                self._close_write()
                return
            del self.pending[:sent]
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.write_fd)
        if self.ended and not self.pending:
            self._close_write()

    def end(self) -> None:
        self.ended = True
        if not self.pending:
            self._close_write()

    def _close_write(self) -> None:
        if self.write_fd >= 0:
            if self._writing:
                self.loop.remove_writer(self.write_fd)
                self._writing = False
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.pending.clear()
        self._close_write()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1


class _Connection(asyncio.Protocol):
    """A connection from this process's proxy to its wasm listener: one request at a time, its body
    streamed to the instance's stdin while the instance runs."""

    def __init__(self, server: "WasmServer") -> None:
        self.server = server
        self.loop = server.loop
        self.transport = None
        self.buf = bytearray()
        self.busy = False  # an exchange is under way (its response not finished)
        self.body: BodyDecoder | None = None  # the request body still arriving
        self.stdin: _StdinFeed | None = None
        self.lingering = False  # answered early: what still comes is dropped until the peer closes

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.stdin is not None:
            self.stdin.end()  # the guest sees the end of what came

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        if self.body is not None:
            self._feed_body(data)
            return
        self.buf += data
        if not self.busy:
            self._next()

    def _feed_body(self, data: bytes) -> None:
        try:
            chunk = self.body.feed(data)
        except HandlerError as exc:
            log.info("wasm: %s", exc)
            if self.stdin is not None:
                self.stdin.end()
            if self.transport is not None:
                self.transport.abort()  # framing is lost: nothing more can be read on this connection
            return
        if self.stdin is not None:
            self.stdin.write(chunk)
        if self.body.done:
            self.buf += self.body.rest
            self.body = None
            if self.stdin is not None:
                self.stdin.end()
            if not self.busy and self.buf:
                self._next()

    def _next(self) -> None:
        try:
            head = parse_request(self.buf, 0)
        except ProtocolError as exc:
            self._answer(exc.status, b"bad request\n", close=True)
            return
        if head is None:
            return
        rest = bytes(self.buf[head.length:])
        self.buf.clear()
        service = self.server.router.route(head.host, head.path)
        length = head.body_length
        if service is None or (length > 0 and length > service.cfg.max_body):
            status, text = (404, b"no wasm service here\n") if service is None else \
                (413, b"request body over the handler's max_body\n")
            self._answer(status, text, close=length != 0)
            return
        self.busy = True
        client = dict((n.lower(), v) for n, v in head.headers).get(b"x-forwarded-for", b"").split(b",")[-1].strip()
        stdin = None
        if length != 0:
            stdin = self.stdin = _StdinFeed(self.loop, service.cfg.max_body)
            self.body = BodyDecoder(length)
        env = cgi_environment(head, max(length, 0), service.prefix, client.decode("latin-1"), service.cfg.env)
        exchange = _Exchange(self, service, head.method == b"HEAD")
        future = service.submit(env, stdin.path if stdin is not None else None, exchange.output)
        future.add_done_callback(lambda f: self._done(f, exchange, stdin))
        if self.body is not None:
            self._feed_body(rest)
        elif rest:
            self.buf += rest

    def _done(self, future, exchange: _Exchange, stdin: _StdinFeed | None) -> None:
        service = exchange.service
        stats = service.stats
        ended = perf_counter()
        too_large = stdin is not None and stdin.too_large
        if stdin is not None:
            stdin.close()
            if self.stdin is stdin:
                self.stdin = None
        try:
            instantiate, run = future.result()
            if too_large:
                raise HandlerError("body_size", f"request body over max_body ({service.cfg.max_body} bytes)", 413)
            exchange.finish(instantiate, run)
        except HandlerError as exc:
            stats.errors[exc.reason] = stats.errors.get(exc.reason, 0) + 1
            log.warning("wasm service %s: %s (%d)", service.name, exc, exc.status)
            if exchange.streaming or self.body is not None:  # a head is out, or a body can no longer be framed
                if exchange.streaming or too_large:
                    if self.transport is not None:
                        self.transport.abort()
                    return
            self._answer(exc.status, f"wasm handler failed: {exc.reason}\n".encode(), close=too_large)
            return
        except Exception as exc:  # a bug of ours: the same 502, with its traceback once
            log.exception("wasm service %s: %s", service.name, exc)
            stats.errors["internal"] = stats.errors.get("internal", 0) + 1
            self._answer(502, b"wasm handler failed: internal\n", close=True)
            return
        stats.instantiate.observe(instantiate)
        stats.run.observe(run)
        stats.write.observe(perf_counter() - ended)
        self._finished()

    def _finished(self) -> None:
        self.busy = False
        if self.body is None and self.buf:  # the next request (its body, if any, is still to come otherwise)
            self._next()

    def _answer(self, status: int, body: bytes, close: bool = False) -> None:
        extra = b"Connection: close\r\n" if close else b""
        self.write(http_head(status, [(b"Content-Type", b"text/plain")], len(body), extra) + body)
        if close:
            self.busy = False
            self.body = None
            if self.transport is not None:
                self.lingering = True  # read and drop the rest; the peer closes once it has the answer
                self.loop.call_later(LINGER_SECONDS, self._end_linger)
            return
        self._finished()

    def _end_linger(self) -> None:
        if self.transport is not None:
            self.transport.close()


class WasmServer:
    """This process's wasm services behind one loopback listener; routed as the proxy routes them."""

    def __init__(self, loop=None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.services: dict[str, WasmService] = {}
        self.router: Router = Router()
        self.server = None
        self.port = 0

    def configure(self, config) -> None:
        """The wasm services of a (re)loaded config; a service whose wasm table is unchanged keeps its
        compiled module and pool."""
        services = {}
        for name, svc in config.services.items():
            if svc.wasm is None:
                continue
            old = self.services.get(name)
            service = old if old is not None and old.cfg == svc.wasm else WasmService(name, svc.wasm)
            service.prefix = svc.paths[0] if len(svc.paths) == 1 else ""
            services[name] = service
        router = Router(services.get(config.proxy.default_service))
        for name, service in services.items():
            svc = config.services[name]
            if svc.hosts:
                router.add(svc.hosts, svc.paths, service)
        for name, old in self.services.items():
            if services.get(name) is not old:
                old.close()
        self.services, self.router = services, router

    async def start(self) -> int:
        self.server = await self.loop.create_server(lambda: _Connection(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for service in self.services.values():
            service.close()
