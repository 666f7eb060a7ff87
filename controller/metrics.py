"""Prometheus exposition: a prometheus-client collector that reads wakegate's own counters at scrape time.

The data path and the services keep plain counters and fixed-bucket histograms
(proxy/metrics.py); nothing here runs per request. Names follow DESIGN.md,
all prefixed ``wakegate_``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .service import State


# Every family wakegate exports: name, type, help, labels. Both exporters below use it.
_FAMILIES = [
    ("wakegate_requests", "counter", "Requests answered, by service and status code.", ["service", "code"]),
    ("wakegate_request_duration_seconds", "histogram",
     "First byte of the request head to the last byte of the response.", ["service"]),
    ("wakegate_request_queue_seconds", "histogram", "Time a request was held for a wake.", ["service"]),
    ("wakegate_upstream_response_seconds", "histogram", "Request head sent upstream to the first response byte.",
     ["service"]),
    ("wakegate_upstream_connect_seconds", "histogram", "New upstream connections: connect time.", ["service"]),
    ("wakegate_requests_in_flight", "gauge", "Requests being served (tunnels included).", ["service"]),
    ("wakegate_requests_queued", "gauge", "Requests held while the service wakes.", ["service"]),
    ("wakegate_wakes", "counter", "Wakes, by sleep mode and result (ok, failed, timeout).", ["service", "mode", "result"]),
    ("wakegate_wake_duration_seconds", "histogram", "Wake decision to ready (backend resume plus readiness wait).",
     ["service", "mode"]),
    ("wakegate_wake_resume_seconds", "histogram", "The backend's own part of a wake: thaw or process start.",
     ["service", "mode"]),
    ("wakegate_wake_ready_seconds", "histogram", "The readiness wait of a wake, after the backend resumed.",
     ["service", "mode"]),
    ("wakegate_sleeps", "counter", "Sleeps, by mode and reason (idle, admin, exited).", ["service", "mode", "reason"]),
    ("wakegate_service_state", "gauge", "1 for the state the service is in.", ["service", "state"]),
    ("wakegate_upstream_errors", "counter",
     "Upstream failures (refused, reset, timeout, connect_timeout, bad_response).", ["service", "reason"]),
    ("wakegate_backend_starts", "counter", "Starts of a backend that sleeps as a snapshot (microVM, CRIU "
     "process), by kind: cold, restore (from the snapshot), cont (a paused VM resumed).", ["service", "kind"]),
    ("wakegate_snapshot_bytes", "gauge", "Size of the service's snapshot on disk (0: none).", ["service"]),
    ("wakegate_snapshot_resident_bytes", "gauge", "Of the snapshot's bytes, those in memory (page cache or "
     "tmpfs): a restore maps or reads them without touching a disk.", ["service"]),
    ("wakegate_backend_start_seconds", "histogram", "A snapshot backend's wakes by kind (cold, restore, cont) "
     "and phase: resume (decision to the service running again) and ready (then to its first answer).",
     ["service", "kind", "phase"]),
    ("wakegate_snapshot_save_seconds", "histogram", "Writing a snapshot (microVM or CRIU process), start to complete.",
     ["service"]),
    ("wakegate_wasm_seconds", "histogram", "A wasm service's requests by phase: instantiate (a fresh instance), "
     "run (the module until it exits) and write (then to the last byte of the response).", ["service", "phase"]),
    ("wakegate_wasm_errors", "counter", "Wasm handler failures answered 502, by reason (trap, time, memory, "
     "response_size, malformed, exit, module).", ["service", "reason"]),
    ("wakegate_client_errors", "counter", "Requests refused before routing (bad_request, head_too_large, ...).",
     ["reason"]),
    ("wakegate_access_log_dropped", "counter", "Access log lines dropped for a slow disk.", []),
    ("wakegate_accept_errors", "counter", "Connections wakegate could not take: fd_limit (out of file "
     "descriptors: the kernel's pending connections are dropped), admin_limit (admin connections at their cap).",
     ["reason"]),
]
_KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}


def _histogram(family: HistogramMetricFamily, labels: list[str], hist) -> None:
    family.add_metric(labels, hist.cumulative(), hist.sum)


class WakegateCollector:
    def __init__(self, controller, routes: dict, proxy_stats, access_log=None) -> None:
        self.controller = controller
        self.routes = routes  # service name -> ServiceRoute (with .stats)
        self.proxy_stats = proxy_stats
        self.access_log = access_log

    def describe(self):
        return []

    def collect(self):
        (requests, duration, queue, upstream, connect, in_flight, queued, wakes, wake_duration, wake_resume,
         wake_ready, sleeps, state, upstream_errors, boots, snapshot_bytes, resident_bytes, start_seconds,
         save_seconds, wasm_seconds, wasm_errors, client_errors,
         dropped, accept_errors) = families = [
            _KINDS[kind](name, doc, labels=labels) for name, kind, doc, labels in _FAMILIES
        ]
        states = [s.value for s in State]

        for name, service in self.controller.services.items():
            mode = service.backend.mode if service.backend is not None else "none"
            route = self.routes.get(name)
            if route is not None:
                stats = route.stats
                for code, n in stats.codes.items():
                    requests.add_metric([name, str(code)], n)
                if stats.codes:  # idle services export no empty histograms
                    _histogram(duration, [name], stats.duration)
                    _histogram(upstream, [name], stats.upstream)
                    _histogram(queue, [name], stats.queue)
                    if stats.connect.counts != [0] * len(stats.connect.counts):
                        _histogram(connect, [name], stats.connect)
                for reason, n in stats.upstream_errors.items():
                    upstream_errors.add_metric([name, reason], n)
                if stats.wasm is not None:
                    if stats.wasm.run.count:
                        for phase in stats.wasm.PHASES:
                            _histogram(wasm_seconds, [name, phase], getattr(stats.wasm, phase))
                    for reason, n in stats.wasm.errors.items():
                        wasm_errors.add_metric([name, reason], n)
            in_flight.add_metric([name], service.in_flight)
            queued.add_metric([name], service.queued)
            current = service.state.value
            for st in states:
                state.add_metric([name, st], 1.0 if st == current else 0.0)
            if service.backend is not None:
                for result, n in service.wake_results.items():
                    wakes.add_metric([name, mode, result], n)
                for reason, n in service.sleep_reasons.items():
                    sleeps.add_metric([name, mode, reason], n)
                if service.wake_results:
                    _histogram(wake_duration, [name, mode], service.wake_seconds)
                    _histogram(wake_resume, [name, mode], service.resume_seconds)
                    _histogram(wake_ready, [name, mode], service.ready_seconds)
                snap = service.backend.snapshot_stats()
                if snap is not None:
                    for kind, n in snap.starts.items():
                        boots.add_metric([name, kind], n)
                    snapshot_bytes.add_metric([name], snap.snapshot_bytes)
                    resident_bytes.add_metric([name], snap.resident_bytes)
                    for (kind, phase), hist in sorted((snap.phases or {}).items()):
                        _histogram(start_seconds, [name, kind, phase], hist)
                    if snap.saves:
                        _histogram(save_seconds, [name], snap.save_seconds)
        for reason, n in self.proxy_stats.client_errors.items():
            client_errors.add_metric([reason], n)
        dropped.add_metric([], self.proxy_stats.access_dropped)
        for reason, n in self.proxy_stats.accept_errors.items():
            accept_errors.add_metric([reason], n)
        yield from families


def make_registry(collector: WakegateCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


# ---- the fast path for scrapes ------------------------------------------------------
#
# Building prometheus-client objects for 1,000 services takes tens of milliseconds per
# scrape. FastExposition writes the same text directly, and reuses the lines of every
# service whose numbers have not changed since the last scrape. tests/test_metrics.py
# checks that it parses to exactly what WakegateCollector + generate_latest give.

_INDEX = {name: i for i, (name, _, _, _) in enumerate(_FAMILIES)}
_PER_SERVICE = _FAMILIES[:-3]  # the last three have no service label


def _num(value) -> str:
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _hist_lines(out: list, name: str, labels: str, hist) -> None:
    for le, count in hist.cumulative():
        out.append(f'{name}_bucket{{{labels},le="{le}"}} {_num(count)}\n')
    out.append(f"{name}_count{{{labels}}} {_num(hist.count)}\n")
    out.append(f"{name}_sum{{{labels}}} {_num(hist.sum)}\n")


class FastExposition:
    """The Prometheus text format for wakegate, cached per service between scrapes."""

    def __init__(self, controller, routes: dict, proxy_stats) -> None:
        self.controller = controller
        self.routes = routes
        self.proxy_stats = proxy_stats
        self._cache: dict[str, tuple] = {}  # service -> (version, [lines per family])
        self._labels: dict[str, str] = {}  # service -> its label text (services come and go: discovery)

    def _version(self, name, service, stats):
        snap = service.backend.snapshot_stats() if service.backend is not None else None
        snapshot = (snap.saves, snap.snapshot_bytes, snap.resident_bytes, sum(snap.starts.values())) \
            if snap is not None else ()
        if stats is None:
            return (service.state, service.in_flight, service.queued, service.wakes, service.failures, service.sleeps,
                    snapshot)
        wasm = (stats.wasm.run.sum, sum(stats.wasm.errors.values())) if stats.wasm is not None else ()
        return (service.state, service.in_flight, service.queued, service.wakes, service.failures, service.sleeps,
                snapshot, stats.duration.sum, sum(stats.upstream_errors.values()), wasm)

    def _service_lines(self, name: str, service, stats) -> list[list[str]]:
        per = [[] for _ in _PER_SERVICE]
        label = self._labels.get(name)
        if label is None:
            label = self._labels[name] = f'service="{_escape(name)}"'
        mode = service.backend.mode if service.backend is not None else "none"
        if stats is not None:
            lines = per[_INDEX["wakegate_requests"]]
            for code, n in stats.codes.items():
                lines.append(f'wakegate_requests_total{{{label},code="{code}"}} {_num(n)}\n')
            if stats.codes:
                _hist_lines(per[1], "wakegate_request_duration_seconds", label, stats.duration)
                _hist_lines(per[2], "wakegate_request_queue_seconds", label, stats.queue)
                _hist_lines(per[3], "wakegate_upstream_response_seconds", label, stats.upstream)
                if any(stats.connect.counts):
                    _hist_lines(per[4], "wakegate_upstream_connect_seconds", label, stats.connect)
            for reason, n in stats.upstream_errors.items():
                per[13].append(f'wakegate_upstream_errors_total{{{label},reason="{_escape(reason)}"}} {_num(n)}\n')
            wasm = stats.wasm
            if wasm is not None:
                if wasm.run.count:
                    for phase in wasm.PHASES:
                        _hist_lines(per[19], "wakegate_wasm_seconds", f'{label},phase="{phase}"', getattr(wasm, phase))
                for reason, n in wasm.errors.items():
                    per[20].append(f'wakegate_wasm_errors_total{{{label},reason="{_escape(reason)}"}} {_num(n)}\n')
        per[5].append(f"wakegate_requests_in_flight{{{label}}} {_num(service.in_flight)}\n")
        per[6].append(f"wakegate_requests_queued{{{label}}} {_num(service.queued)}\n")
        mode_label = f'{label},mode="{mode}"'
        if service.backend is not None:
            for result, n in service.wake_results.items():
                per[7].append(f'wakegate_wakes_total{{{mode_label},result="{result}"}} {_num(n)}\n')
            if service.wake_results:
                _hist_lines(per[8], "wakegate_wake_duration_seconds", mode_label, service.wake_seconds)
                _hist_lines(per[9], "wakegate_wake_resume_seconds", mode_label, service.resume_seconds)
                _hist_lines(per[10], "wakegate_wake_ready_seconds", mode_label, service.ready_seconds)
            for reason, n in service.sleep_reasons.items():
                per[11].append(f'wakegate_sleeps_total{{{mode_label},reason="{_escape(reason)}"}} {_num(n)}\n')
            snap = service.backend.snapshot_stats()
            if snap is not None:
                for kind, n in snap.starts.items():
                    per[14].append(f'wakegate_backend_starts_total{{{label},kind="{kind}"}} {_num(n)}\n')
                per[15].append(f"wakegate_snapshot_bytes{{{label}}} {_num(snap.snapshot_bytes)}\n")
                per[16].append(f"wakegate_snapshot_resident_bytes{{{label}}} {_num(snap.resident_bytes)}\n")
                for (kind, phase), hist in sorted((snap.phases or {}).items()):
                    _hist_lines(per[17], "wakegate_backend_start_seconds", f'{label},kind="{kind}",phase="{phase}"', hist)
                if snap.saves:
                    _hist_lines(per[18], "wakegate_snapshot_save_seconds", label, snap.save_seconds)
        current = service.state
        for st in State:
            per[12].append(f'wakegate_service_state{{{label},state="{st.value}"}} {"1.0" if st is current else "0.0"}\n')
        return per

    def render(self) -> bytes:
        families = [[] for _ in _PER_SERVICE]
        cache = self._cache
        for name, service in self.controller.services.items():
            route = self.routes.get(name)
            stats = route.stats if route is not None else None
            version = self._version(name, service, stats)
            cached = cache.get(name)
            if cached is None or cached[0] != version:
                cached = cache[name] = (version, self._service_lines(name, service, stats))
            for i, lines in enumerate(cached[1]):
                if lines:
                    families[i].append("".join(lines))
        if len(cache) > len(self.controller.services):  # a service went away: forget its lines
            for gone in set(cache) - set(self.controller.services):
                del cache[gone]
                self._labels.pop(gone, None)
        out = []
        for (name, kind, doc, _labels), chunks in zip(_FAMILIES, families + [[], [], []]):
            suffix = "_total" if kind == "counter" else ""
            out.append(f"# HELP {name}{suffix} {doc}\n# TYPE {name}{suffix} {kind}\n")
            out.extend(chunks)
            if name == "wakegate_client_errors":
                for reason, n in self.proxy_stats.client_errors.items():
                    out.append(f'wakegate_client_errors_total{{reason="{_escape(reason)}"}} {_num(n)}\n')
            elif name == "wakegate_access_log_dropped":
                out.append(f"wakegate_access_log_dropped_total {_num(self.proxy_stats.access_dropped)}\n")
            elif name == "wakegate_accept_errors":
                for reason, n in self.proxy_stats.accept_errors.items():
                    out.append(f'wakegate_accept_errors_total{{reason="{_escape(reason)}"}} {_num(n)}\n')
        return "".join(out).encode()
