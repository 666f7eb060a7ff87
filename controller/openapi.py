"""The admin API described in OpenAPI 3.0, served at ``GET /openapi.json``; tests/test_admin.py checks
the implementation against it with schemathesis. Change both together."""

from __future__ import annotations

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_NAME = {"name": "name", "in": "path", "required": True, "description": "the service's name in the config",
         "schema": {"type": "string"}}
_NULLABLE_NUMBER = {"type": "number", "nullable": True}

_WORKER_COUNTS = {
    "type": "object",
    "required": ["worker", "in_flight", "queued"],
    "properties": {"worker": {"type": "integer"}, "in_flight": {"type": "integer"}, "queued": {"type": "integer"},
                   "pid": {"type": "integer", "nullable": True}},
}

_SERVICE = {
    "type": "object",
    "required": ["name", "state", "mode", "in_flight", "tunnels", "queued", "wakes", "sleeps", "failures", "pid"],
    "properties": {
        "name": {"type": "string"},
        "state": {"type": "string", "enum": ["asleep", "waking", "ready", "sleeping", "failed"]},
        "mode": {"type": "string", "nullable": True, "description": "pause, stop, snapshot or wasm; null: always up"},
        "in_flight": {"type": "integer"},
        "tunnels": {"type": "integer"},
        "queued": {"type": "integer"},
        "wakes": {"type": "integer"},
        "sleeps": {"type": "integer"},
        "failures": {"type": "integer"},
        "last_wake_ms": _NULLABLE_NUMBER,
        "last_resume_ms": _NULLABLE_NUMBER,
        "last_ready_ms": _NULLABLE_NUMBER,
        "idle_seconds": {"type": "number"},
        "pid": {"type": "integer", "nullable": True},
        "workers": {"type": "array", "items": _WORKER_COUNTS},
    },
    "additionalProperties": True,  # backend facts (microvm, snapshot, docker, wasm ...)
}

_WORKER = {
    "type": "object",
    "required": ["worker", "pid", "alive", "restarts"],
    "properties": {"worker": {"type": "integer"}, "pid": {"type": "integer", "nullable": True},
                   "alive": {"type": "boolean"}, "restarts": {"type": "integer"},
                   "connections": {"type": "integer", "nullable": True},
                   "requests": {"type": "integer", "nullable": True}},
}

_COMMAND = {
    "type": "object",
    "required": ["name", "state", "requested"],
    "properties": {"name": {"type": "string"}, "state": {"type": "string"},
                   "requested": {"type": "string", "enum": ["wake", "sleep"]}},
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _command(verb: str) -> dict:
    return {
        "summary": f"{verb.capitalize()} the service (done in the background)",
        "parameters": [_NAME],
        "responses": {
            "202": _json(_COMMAND, "accepted"),
            "401": _json(_ERROR, "missing or wrong bearer token"),
            "404": _json(_ERROR, "no such service"),
            "409": _json(_ERROR, "the service is always up: there is nothing to " + verb),
        },
    }


def document(version: str) -> dict:
    return {
        "openapi": "3.0.3",
        "info": {"title": "wakegate admin API", "version": version,
                 "description": "Service states, wake and sleep commands, reloads and metrics of a running wakegate."},
        "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                                                     "description": "[admin] token, when set"}}},
        "security": [{"token": []}, {}],
        "paths": {
            "/healthz": {"get": {"summary": "Liveness (never needs the token)", "security": [],
                                 "responses": {"200": {"description": "ok",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/services": {"get": {
                "summary": "Every service's state and counts, and the proxy workers",
                "responses": {
                    "200": _json({"type": "object", "required": ["services"], "properties": {
                        "services": {"type": "array", "items": _SERVICE},
                        "workers": {"type": "array", "items": _WORKER},
                        "reloads": {"type": "integer"}}}, "the services"),
                    "401": _json(_ERROR, "missing or wrong bearer token"),
                }}},
            "/services/{name}/wake": {"post": _command("wake")},
            "/services/{name}/sleep": {"post": _command("sleep")},
            "/reload": {"post": {
                "summary": "Read the config file again and apply it (as SIGHUP)",
                "responses": {
                    "200": _json({"type": "object", "required": ["ok", "changes"], "properties": {
                        "ok": {"type": "boolean"}, "changes": {"type": "array", "items": {"type": "string"}},
                        "kept": {"type": "array", "items": {"type": "string"}}}}, "applied"),
                    "400": _json({"type": "object", "required": ["ok", "error"], "properties": {
                        "ok": {"type": "boolean"}, "error": {"type": "string"}}},
                        "the file did not validate; nothing changed"),
                    "401": _json(_ERROR, "missing or wrong bearer token"),
                    "409": _json(_ERROR, "no running wakegate to reload"),
                }}},
            "/metrics": {"get": {
                "summary": "Prometheus text exposition, summed over every proxy worker",
                "responses": {
                    "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "401": _json(_ERROR, "missing or wrong bearer token"),
                    "404": _json(_ERROR, "metrics are off ([metrics] enabled = false)"),
                }}},
            "/": {"get": {
                "summary": "The live status page (HTML; a browser passes the token as ?token=)",
                "parameters": [{"name": "token", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}},
                    "401": _json(_ERROR, "missing or wrong token"),
                }}},
            "/status.json": {"get": {
                "summary": "What the status page draws: states, counts and requests answered per service",
                "responses": {
                    "200": _json({"type": "object", "required": ["time", "services", "workers"], "properties": {
                        "time": {"type": "number"}, "workers": {"type": "integer"},
                        "services": {"type": "array", "items": {"type": "object", "required": ["name", "state",
                                                                                                "requests"]}}}},
                        "the services"),
                    "401": _json(_ERROR, "missing or wrong bearer token"),
                }}},
            "/openapi.json": {"get": {
                "summary": "This description", "security": [],
                "responses": {"200": _json({"type": "object"}, "the OpenAPI document")}}},
        },
    }
