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
MAX_STDERR_KEPT = 2048  # of a failing handler's stderr, the part that goes in the log line
BODY_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None  # a request body is handed to stdin as a file
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te", b"trailer", b"upgrade",
               b"status", b"proxy-connection"}
_REASONS = {200: b"OK", 201: b"Created", 204: b"No Content", 301: b"Moved Permanently", 302: b"Found",
            304: b"Not Modified", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
            405: b"Method Not Allowed", 413: b"Content Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway"}


class HandlerError(Exception):
    """Why a handler's request got a 502 (reason: trap, time, memory, response_size, malformed, exit)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


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

    def submit(self, env: list, body: bytes, out) -> "asyncio.Future":
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=self.cfg.instances, thread_name_prefix=f"wasm-{self.name}")
        return asyncio.wrap_future(self.pool.submit(self.run, env, body, out))

    def run(self, env: list, body: bytes, out) -> tuple[float, float]:
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
        stdin = None
        for guest, host, writable in cfg.dirs:
            wasi.preopen_dir(host, guest, writable)
        try:
            if body:
                stdin = tempfile.NamedTemporaryFile(dir=BODY_DIR, prefix="wakegate-wasm-")
                stdin.write(body)
                stdin.flush()
                wasi.stdin_file = stdin.name
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
        finally:
            if stdin is not None:
                stdin.close()
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
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Status"))]
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


class _Connection(asyncio.Protocol):
    """A connection from this process's proxy to its wasm listener: requests one after another."""

    def __init__(self, server: "WasmServer") -> None:
        self.server = server
        self.loop = server.loop
        self.transport = None
        self.buf = bytearray()
        self.busy = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        try:
            head = parse_request(self.buf, 0)
        except ProtocolError as exc:
            self._answer(exc.status, b"bad request\n", close=True)
            return
        if head is None:
            return
        body = self._body(head)
        if body is None:
            return  # more bytes to come
        route = self.server.router.route(head.host, head.path)
        if route is None:
            self._answer(404, b"no wasm service here\n")
            return
        service = route
        if len(body) > service.cfg.max_body:
            self._answer(413, b"request body over the handler's max_body\n", close=True)
            return
        self.busy = True
        client = dict((n.lower(), v) for n, v in head.headers).get(b"x-forwarded-for", b"").split(b",")[-1].strip()
        env = cgi_environment(head, len(body), service.prefix, client.decode("latin-1"), service.cfg.env)
        exchange = _Exchange(self, service, head.method == b"HEAD")
        future = service.submit(env, body, exchange.output)
        future.add_done_callback(lambda f: self._done(f, exchange))

    def _body(self, head) -> bytes | None:
        """The whole request body once it is in (consumed from buf), or None."""
        start = head.length
        if head.body_length == CHUNKED:
            out, pos = bytearray(), start
            while True:
                line_end = self.buf.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(bytes(self.buf[pos:line_end]).split(b";")[0], 16)
                if size == 0:
                    end = self.buf.find(b"\r\n\r\n", line_end)
                    if end < 0 and self.buf[line_end:line_end + 4] != b"\r\n\r\n":
                        return None
                    end = line_end if self.buf[line_end:line_end + 4] == b"\r\n\r\n" else end
                    del self.buf[:end + 4]
                    return bytes(out)
                if len(self.buf) < line_end + 2 + size + 2:
                    return None
                out += self.buf[line_end + 2:line_end + 2 + size]
                pos = line_end + 2 + size + 2
        length = max(0, head.body_length)
        if len(self.buf) < start + length:
            return None
        body = bytes(self.buf[start:start + length])
        del self.buf[:start + length]
        return body

    def _done(self, future, exchange: _Exchange) -> None:
        service = exchange.service
        stats = service.stats
        ended = perf_counter()
        try:
            instantiate, run = future.result()
            exchange.finish(instantiate, run)
        except HandlerError as exc:
            stats.errors[exc.reason] = stats.errors.get(exc.reason, 0) + 1
            log.warning("wasm service %s: %s (502)", service.name, exc)
            if exchange.streaming:  # the head is out: only a cut connection can say so
                if self.transport is not None:
                    self.transport.abort()
                return
            self._answer(502, f"wasm handler failed: {exc.reason}\n".encode())
            return
        except Exception as exc:  # a bug of ours: the same 502, with its traceback once
            log.exception("wasm service %s: %s", service.name, exc)
            stats.errors["internal"] = stats.errors.get("internal", 0) + 1
            self._answer(502, b"wasm handler failed: internal\n")
            return
        stats.instantiate.observe(instantiate)
        stats.run.observe(run)
        stats.write.observe(perf_counter() - ended)
        self.busy = False
        if self.buf:
            self._next()

    def _answer(self, status: int, body: bytes, close: bool = False) -> None:
        self.busy = False
        extra = b"Connection: close\r\n" if close else b""
        self.write(http_head(status, [(b"Content-Type", b"text/plain")], len(body), extra) + body)
        if close:
            if self.transport is not None:
                self.transport.close()
            return
        if self.buf:
            self._next()


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
