"""The admin API (aiohttp): service states, and wake or sleep on demand.

``GET /services``, ``POST /services/NAME/wake``, ``POST /services/NAME/sleep``,
``GET /metrics`` (Prometheus text format), ``GET /healthz``. With ``[admin] token`` set, every call but /healthz needs
``Authorization: Bearer TOKEN``, compared in constant time. The listener guards itself like the
proxy does: a cap on its connections (they share wakegate's file descriptors), a deadline for each
connection between requests, and one log line, not a traceback, for a malformed request.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("wakegate.admin")

ADMIN_MAX_CONNECTIONS = 64  # admin connections at once; more are closed at accept (Prometheus needs one)
ADMIN_TICK = 0.25  # how often idle admin connections are looked for
BAD_REQUEST_LOG_SECONDS = 60.0  # malformed admin requests are summed up in one line at most this often


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n", status=status,
                        content_type="application/json")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_app(controller, token: str = "", exposition=None, busy: dict | None = None, runtime=None) -> web.Application:
    """runtime (controller/runtime.py): the proxy processes' counts for /metrics and /services, and reloads."""
    expected = token.encode()

    @web.middleware
    async def track(request, handler):
        """Mark the connection busy while a request is handled, for the idle deadline."""
        protocol = request.protocol
        if busy is not None:
            busy[protocol] = None  # in progress
        try:
            return await handler(request)
        finally:
            if busy is not None:
                busy[protocol] = time.monotonic()  # done at

    @web.middleware
    async def auth(request, handler):
        if expected and request.path not in ("/healthz", "/openapi.json"):
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if request.path == "/" and not given:  # a browser opening the status page: ?token=
                scheme, value = "bearer", request.query.get("token", "")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
                return _json({"error": "missing or wrong bearer token"}, 401)
        return await handler(request)

    async def healthz(request):
        return web.Response(text="ok\n")

    async def services(request):
        body = {"services": controller.snapshot()}
        if runtime is not None:
            body["workers"] = workers = runtime.workers()
            body["reloads"] = runtime.reloads
            pids = {w["worker"]: w["pid"] for w in workers}
            for service in body["services"]:
                for column in service["workers"]:
                    column["pid"] = pids.get(column["worker"])
        return _json(body)

    async def reload(request):
        if runtime is None:
            return _json({"error": "reload needs a running wakegate"}, 409)
        result = await runtime.reload()
        return _json(result, 200 if result["ok"] else 400)

    def _service(request):
        name = request.match_info["name"]
        service = controller.services.get(name)
        if service is None:
            raise web.HTTPNotFound(body=orjson.dumps({"error": f"no service {name!r}"}), content_type="application/json")
        return service

    async def wake(request):
        service = _service(request)
        if service.backend is None:
            return _json({"error": f"service {service.name!r} has no command: it is always up"}, 409)
        service.request_wake()
        return _json({"name": service.name, "state": service.state.value, "requested": "wake"}, 202)

    async def sleep(request):
        service = _service(request)
        if service.backend is None:
            return _json({"error": f"service {service.name!r} has no command: it cannot sleep"}, 409)
        service.request_sleep("admin")
        return _json({"name": service.name, "state": service.state.value, "requested": "sleep"}, 202)

    async def metrics(request):
        from prometheus_client import CONTENT_TYPE_LATEST

        if exposition is None:
            return _json({"error": "metrics are off ([metrics] enabled = false)"}, 404)
        if runtime is not None:
            await runtime.refresh_stats()
        return web.Response(body=exposition.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[track, auth])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/services", services)
    app.router.add_post("/services/{name}/wake", wake)
    app.router.add_post("/services/{name}/sleep", sleep)
    app.router.add_post("/reload", reload)

    async def openapi(request):
        from . import __version__
        from .openapi import document

        return _json(document(__version__))

    app.router.add_get("/openapi.json", openapi)

    async def status_page(request):
        from .statuspage import PAGE

        return web.Response(text=PAGE, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def status_json(request):
        """What the status page draws: every service's state and counts, with requests answered."""
        answered = {}
        if runtime is not None:
            await runtime.refresh_stats()
            answered = {name: sum(merged.stats.codes.values()) for name, merged in runtime.routes.items()}
        services = [{key: s.get(key) for key in ("name", "state", "mode", "in_flight", "queued", "wakes",
                                                "last_wake_ms", "last_resume_ms", "last_ready_ms")}
                    | {"requests": answered.get(s["name"], 0)} for s in controller.snapshot()]
        return _json({"time": time.time(), "services": services,
                      "workers": len(runtime.workers()) if runtime is not None else 1})

    app.router.add_get("/", status_page)
    app.router.add_get("/status.json", status_json)
    return app


class _BadRequestLog(logging.Filter):
    """aiohttp logs every malformed request with a full traceback; count them instead, and say so
    in one line a minute at most."""

    def __init__(self, stats) -> None:
        super().__init__()
        self.stats = stats
        self.unreported = 0
        self.reported_at = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return record.levelno >= logging.getLogger().getEffectiveLevel()
        errors = self.stats.client_errors
        errors["admin_bad_request"] = errors.get("admin_bad_request", 0) + 1
        self.unreported += 1
        now = time.monotonic()
        if now - self.reported_at < BAD_REQUEST_LOG_SECONDS:
            return False
        record.msg, record.args = "admin: %d malformed request(s) refused with 400 (last: %s)", (
            self.unreported, str(exc).splitlines()[0][:200])
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        self.unreported, self.reported_at = 0, now
        return True


class _Refuse(asyncio.Protocol):
    """An admin connection over the cap: closed at once."""

    def connection_made(self, transport) -> None:
        transport.close()


class AdminListener:
    """The admin API's listening socket and its guards; ``close()`` ends it all."""

    def __init__(self, runner: web.AppRunner, busy: dict, stats, log_filter: _BadRequestLog,
                 idle_timeout: float) -> None:
        self.runner = runner
        self.idle_timeout = idle_timeout  # [admin] idle_timeout
        self.busy = busy  # protocol -> None (busy) or when its last request ended
        self.stats = stats
        self.log_filter = log_filter
        self.born: dict = {}  # protocol -> when it connected
        self.server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.TimerHandle | None = None

    def _factory(self):
        web_server = self.runner.server
        if len(web_server.connections) >= ADMIN_MAX_CONNECTIONS:
            errors = self.stats.accept_errors
            errors["admin_limit"] = errors.get("admin_limit", 0) + 1
            return _Refuse()
        protocol = web_server()
        self.born[protocol] = time.monotonic()
        return protocol

    async def start(self, host: str, port: int, sock=None) -> None:
        """Listen on host:port, or on sock (a listening socket handed over by systemd)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.server = await loop.create_server(self._factory, sock=sock, backlog=128)
        else:
            self.server = await loop.create_server(self._factory, host, port, reuse_address=True, backlog=128)
        self._ticker = loop.call_later(ADMIN_TICK, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        live = set(self.runner.server.connections)
        for protocol in list(self.born):
            if protocol not in live and protocol.transport is None:
                del self.born[protocol]
                self.busy.pop(protocol, None)
                continue
            last = self.busy.get(protocol, self.born[protocol])
            if last is not None and now - last > self.idle_timeout and protocol.transport is not None:
                errors = self.stats.client_errors
                if protocol not in self.busy:  # never finished a request
                    errors["admin_timeout"] = errors.get("admin_timeout", 0) + 1
                protocol.transport.close()
        self._ticker = asyncio.get_running_loop().call_later(ADMIN_TICK, self._sweep)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self.server is not None:
            self.server.close()
        await self.runner.cleanup()
        logging.getLogger("aiohttp.server").removeFilter(self.log_filter)


async def start_admin(controller, settings, exposition=None, stats=None, runtime=None, sock=None) -> AdminListener:
    """Listen for the admin API (stats: the proxy's ProxyStats, where admin errors are counted)."""
    if stats is None:
        from proxy.metrics import ProxyStats

        stats = ProxyStats()
    if not settings.token and not is_loopback(settings.listen.host):
        log.warning("the admin API listens on %s without a token: anyone who can reach it can wake and sleep "
                    "services and read /metrics; set [admin] token", settings.listen)
    busy: dict = {}
    runner = web.AppRunner(make_app(controller, settings.token, exposition, busy, runtime), access_log=None,
                           keepalive_timeout=settings.idle_timeout * 2 + 1)  # ours acts first and counts
    await runner.setup()
    log_filter = _BadRequestLog(stats)
    server_log = logging.getLogger("aiohttp.server")
    server_log.addFilter(log_filter)
    server_log.setLevel(logging.DEBUG)  # it logs some malformed requests at debug level: count those too
    listener = AdminListener(runner, busy, stats, log_filter, settings.idle_timeout)
    try:
        await listener.start(settings.listen.host, settings.listen.port, sock)
    except BaseException:
        await listener.close()
        raise
    return listener
