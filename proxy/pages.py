"""Pages wakegate serves itself to browsers: the waiting page shown while a service wakes, and the
small JSON state it polls. Self-contained (no external assets), built once per service name."""

from __future__ import annotations

import html
import json

STATE_PATH = b"/.wakegate/state"  # under every host whose service has a waiting page
POLL_MS = 300  # how often the page asks whether the service is up

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name} is starting</title>
<style>
body{{font-family:system-ui,sans-serif;background:#0f172a;color:#e2e8f0;display:flex;align-items:center;
justify-content:center;height:100vh;margin:0}}
main{{text-align:center;max-width:28rem;padding:2rem}}
h1{{font-size:1.4rem;font-weight:600;margin:0 0 .5rem}}
p{{color:#94a3b8;margin:.25rem 0 1.5rem}}
.bar{{height:6px;border-radius:3px;background:#1e293b;overflow:hidden}}
.fill{{height:100%;width:0;background:#38bdf8;transition:width .3s}}
small{{display:block;margin-top:.75rem;color:#64748b}}
</style></head>
<body><main>
<h1><span id="name">{name}</span> is starting</h1>
<p>It was asleep to save resources. This page goes on to it as soon as it is up.</p>
<div class="bar"><div class="fill" id="fill"></div></div>
<small id="status">waking&hellip;</small>
</main>
<script>
(function () {{
  var started = Date.now(), fill = document.getElementById("fill"), status = document.getElementById("status");
  function tick() {{
    var seconds = (Date.now() - started) / 1000;
    fill.style.width = Math.min(95, 100 * (1 - Math.exp(-seconds / 3))) + "%";
    fetch({state_path}, {{cache: "no-store"}}).then(function (r) {{ return r.json(); }}).then(function (s) {{
      if (s.ready) {{ fill.style.width = "100%"; status.textContent = "ready"; location.reload(); return; }}
      status.textContent = s.state + ", " + seconds.toFixed(1) + " s";
      setTimeout(tick, {poll});
    }}).catch(function () {{ setTimeout(tick, {poll}); }});
  }}
  tick();
}})();
</script></body></html>
"""


def waiting_page(service: str, keep_alive: bool) -> bytes:
    """A whole 503 response with the waiting page (Retry-After for clients that read it)."""
    body = _PAGE.format(name=html.escape(service), state_path=json.dumps(STATE_PATH.decode()), poll=POLL_MS).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Cache-Control: no-store\r\nRetry-After: 1\r\nContent-Length: %d\r\n%s\r\n"
            % (len(body), b"" if keep_alive else b"Connection: close\r\n")) + body


def state_response(service: str, state: str, ready: bool, keep_alive: bool) -> bytes:
    body = json.dumps({"service": service, "state": state, "ready": ready}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (len(body), b"" if keep_alive else b"Connection: close\r\n")) + body


def wants_html(head) -> bool:
    """A browser's navigation: GET with text/html in Accept."""
    if head.method != b"GET":
        return False
    for name, value in head.headers:
        if name.lower() == b"accept":
            return b"text/html" in value
    return False
