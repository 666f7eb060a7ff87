"""The live status page on the admin listener (``GET /``): one self-contained HTML document (no
external assets, no build step) that polls ``/status.json`` every second and draws each service's
state, counts, last wake split, and charts of its request rate and wake durations over the last
minutes. Behind the admin token like the rest: a browser passes it as ``?token=``."""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>wakegate</title>
<style>
body{font-family:system-ui,sans-serif;background:#0f172a;color:#e2e8f0;margin:0;padding:1.5rem}
h1{font-size:1.2rem;margin:0 0 1rem;font-weight:600}h1 small{color:#64748b;font-weight:400;margin-left:.5rem}
table{border-collapse:collapse;width:100%;font-size:.85rem}
th,td{text-align:left;padding:.4rem .5rem;border-bottom:1px solid #1e293b}td{white-space:nowrap}
th{color:#94a3b8;font-weight:500}td.num{text-align:right;font-variant-numeric:tabular-nums}
.state{display:inline-block;padding:.1rem .5rem;border-radius:.75rem;font-size:.8rem}
.ready{background:#14532d;color:#86efac}.asleep{background:#1e293b;color:#94a3b8}
.waking,.sleeping{background:#713f12;color:#fde68a}.failed{background:#7f1d1d;color:#fecaca}
svg{display:block}polyline{fill:none;stroke-width:1.5}polyline.rate{stroke:#38bdf8}polyline.wake{stroke:#f59e0b}
circle.rate{fill:#38bdf8}circle.wake{fill:#f59e0b}
#error{color:#fca5a5}
</style></head><body>
<h1>wakegate <small id="meta"></small> <small id="error"></small></h1>
<table><thead><tr><th>service</th><th>state</th><th>mode</th><th>in flight</th><th>queued</th><th>wakes</th>
<th>last wake ms<br>(resume + ready)</th><th>requests/s<br>last 5 min</th><th>wake ms<br>last 5 min</th></tr></thead>
<tbody id="rows"></tbody></table>
<script>
(function () {
  var token = new URLSearchParams(location.search).get("token");
  var headers = token ? {"Authorization": "Bearer " + token} : {};
  var history = {}, WINDOW = 300;
  function spark(points, cls, max) {
    var W = 120, H = 28;
    if (!points.length) return '<svg width="' + W + '" height="' + H + '"></svg>';
    var last = points[points.length - 1][0], t0 = Math.max(points[0][0], last - WINDOW), span = (last - t0) || 1;
    var top = Math.max(max || 0, 1e-9), xy = points.map(function (p) {
      return [(W - 4) * (p[0] - t0) / span + 2, H - 2 - (H - 4) * p[1] / top];
    });
    var dots = xy.length < 2 ? xy.map(function (p) {
      return '<circle class="' + cls + '" cx="' + p[0].toFixed(1) + '" cy="' + p[1].toFixed(1) + '" r="2"/>';
    }).join("") : "";
    return '<svg width="' + W + '" height="' + H + '"><polyline class="' + cls + '" points="' +
      xy.map(function (p) { return p[0].toFixed(1) + "," + p[1].toFixed(1); }).join(" ") + '"/>' + dots + "</svg>";
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return "&#" + c.charCodeAt(0) + ";"; }); }
  function fmt(v) { return v === null || v === undefined ? "-" : (+v).toFixed(1); }
  function render(data) {
    var rows = [];
    data.services.forEach(function (s) {
      var h = history[s.name] || (history[s.name] = {last: null, rate: [], wake: []});
      if (h.last) {
        var dt = data.time - h.last.time;
        if (dt > 0) h.rate.push([data.time, Math.max(0, (s.requests - h.last.requests) / dt)]);
        if (s.wakes > h.last.wakes && s.last_wake_ms !== null) h.wake.push([data.time, s.last_wake_ms]);
      }
      h.last = {time: data.time, requests: s.requests, wakes: s.wakes};
      h.rate = h.rate.filter(function (p) { return p[0] > data.time - WINDOW; });
      h.wake = h.wake.filter(function (p) { return p[0] > data.time - WINDOW; });
      var rmax = Math.max.apply(null, h.rate.map(function (p) { return p[1]; }).concat([1]));
      var wmax = Math.max.apply(null, h.wake.map(function (p) { return p[1]; }).concat([1]));
      rows.push("<tr><td>" + esc(s.name) + '</td><td><span class="state ' + esc(s.state) + '">' + esc(s.state) +
        "</span></td><td>" + esc(s.mode || "always up") + '</td><td class="num">' + s.in_flight +
        '</td><td class="num">' + s.queued + '</td><td class="num">' + s.wakes + '</td><td class="num">' +
        fmt(s.last_wake_ms) + " (" + fmt(s.last_resume_ms) + " + " + fmt(s.last_ready_ms) + ")</td><td>" +
        spark(h.rate, "rate", rmax) + "</td><td>" + spark(h.wake, "wake", wmax) + "</td></tr>");
    });
    document.getElementById("rows").innerHTML = rows.join("");
    document.getElementById("meta").textContent = data.services.length + " services, " + data.workers +
      " workers, updated " + new Date().toLocaleTimeString();
    document.getElementById("error").textContent = "";
  }
  function poll() {
    fetch("/status.json", {headers: headers, cache: "no-store"}).then(function (r) {
      if (!r.ok) throw new Error("status " + r.status);
      return r.json();
    }).then(render).catch(function (e) {
      document.getElementById("error").textContent = "cannot reach wakegate: " + e.message;
    }).then(function () { setTimeout(poll, 1000); });
  }
  poll();
})();
</script></body></html>
"""
