"""The admin API (aiohttp): service states, and wake or sleep on demand.

``GET /services``, ``POST /services/NAME/wake``, ``POST /services/NAME/sleep``,
``GET /metrics`` (Prometheus text format), ``GET /healthz``. With ``[admin] token`` set, every call but /healthz needs
``Authorization: Bearer TOKEN``, compared in constant time.
"""

from __future__ import annotations

import hmac

import orjson
from aiohttp import web


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n", status=status,
                        content_type="application/json")


def make_app(controller, token: str = "", exposition=None) -> web.Application:
    expected = token.encode()

    @web.middleware
    async def auth(request, handler):
        if expected and request.path != "/healthz":
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
                return _json({"error": "missing or wrong bearer token"}, 401)
        return await handler(request)

    async def healthz(request):
        return web.Response(text="ok\n")

    async def services(request):
        return _json({"services": controller.snapshot()})

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
        return web.Response(body=exposition.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[auth])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/services", services)
    app.router.add_post("/services/{name}/wake", wake)
    app.router.add_post("/services/{name}/sleep", sleep)
    return app


async def start_admin(controller, settings, exposition=None) -> web.AppRunner:
    runner = web.AppRunner(make_app(controller, settings.token, exposition), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port, reuse_address=True)
    await site.start()
    return runner
