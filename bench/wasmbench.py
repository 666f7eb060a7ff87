"""``python -m bench wasm``: a WebAssembly handler (examples/wasm/hello.c) against the same answer from a
process service that is awake (examples/backend.py's /hello), and from one that is paused (each
request a pause-mode wake, measured as ``bench wake`` does), in one run; and the memory that 1,000
configured wasm services take before any traffic.

Every target goes through wakegate (one worker, pinned to CPU 0; wrk on CPU 1). Throughput is wrk at
50 connections, medians of rounds in rotating order, with every non-2xx answer and socket error
counted. Latency is one keep-alive connection sending requests one after another (the time from
wakegate receiving a request to the response leaving cannot be seen from outside; the client's
round trip bounds it from above), with the wasm phases from Server-Timing.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import LOAD_CPU, PROXY_CPU, ROOT, free_port, run_wrk, start, stop_process, wait_port

BACKEND = ROOT / "examples" / "backend.py"
HELLO = ROOT / "build" / "wasm" / "hello.wasm"


def _serve(tmp: Path, name: str, services: str) -> tuple[int, int, subprocess.Popen]:
    port, admin = free_port(), free_port()
    conf = tmp / f"{name}.toml"
    conf.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\nworkers = 1\nupstream_keepalive = 256\n'
                    f'[admin]\nlisten = "127.0.0.1:{admin}"\n[log]\nserver_timing = true\n' + services)
    proc = start([sys.executable, "-m", "controller.cli", "serve", "-c", str(conf), "--log-level", "warning"],
                 PROXY_CPU, tmp / f"{name}.log")
    wait_port(port, 60)
    return port, admin, proc


def _wasm_service(name: str, tmp: Path) -> str:
    return (f'[services.{name}]\nhosts = ["{name}.test"]\n[services.{name}.wasm]\nmodule = "{HELLO}"\n'
            f'cache_dir = "{tmp / "cache"}"\n')


def _latency(port: int, host: str, n: int) -> dict:
    """n sequential requests on one keep-alive connection: client round trips and the wasm phases."""
    s = socket.create_connection(("127.0.0.1", port))
    request = f"GET /hello HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    times, phases = [], []
    try:
        for _ in range(n):
            started = time.perf_counter()
            s.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while len(body) < length:
                body += s.recv(65536)
            times.append(time.perf_counter() - started)
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"server-timing:") and b"wasm-run" in line:
                    parts = dict(p.strip().split(b";dur=") for p in line.split(b":", 1)[1].split(b","))
                    phases.append(float(parts[b"wasm-instantiate"]) + float(parts[b"wasm-run"]))
    finally:
        s.close()
    times.sort()
    out = {"p50_ms": statistics.median(times) * 1e3, "p99_ms": times[int(len(times) * 0.99)] * 1e3}
    if phases:
        out["instantiate_plus_run_p50_ms"] = statistics.median(phases)
    return out


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_of_many(tmp: Path, count: int) -> dict:
    """RSS before any traffic: one wasm service against count of them."""
    out = {}
    for n in (1, count):
        port, _admin, proc = _serve(tmp, f"many-{n}", "".join(_wasm_service(f"w{i}", tmp) for i in range(n)))
        try:
            time.sleep(1.0)
            out[n] = _rss_mib(proc.pid)
        finally:
            stop_process(proc, 30)
    return {"services": count, "rss_mib_one": out[1], "rss_mib_many": out[count],
            "added_mib": out[count] - out[1]}


def wasm(args, progress=print) -> dict:
    if not HELLO.exists():
        raise SystemExit("bench: build/wasm/hello.wasm is missing: run `make wasm`")
    rounds, duration = args.rounds, args.duration
    many = 50 if args.tiny else 1000
    latency_n = 200 if args.tiny else 2000
    with tempfile.TemporaryDirectory(prefix="wakegate-wasm-") as tmpdir:
        tmp = Path(tmpdir)
        b_awake = free_port()
        services = _wasm_service("wasm", tmp) + (
            f'[services.awake]\nhosts = ["awake.test"]\nupstream = "127.0.0.1:{b_awake}"\n'
            f'command = {json.dumps([sys.executable, str(BACKEND), "--port", str(b_awake)])}\n'
            'sleep = "pause"\nidle_timeout = "1h"\n')
        port, _admin, proc = _serve(tmp, "wasm", services)
        runs = {"wasm": [], "awake": []}
        try:
            for host in runs:  # warm up: compile, start the process
                run_wrk(port, 5, 1, host=f"{host}.test", cpus=LOAD_CPU, path="/hello")
            latency = {host: _latency(port, f"{host}.test", latency_n) for host in runs}
            for rnd in range(rounds):
                order = list(runs)[rnd % 2:] + list(runs)[:rnd % 2]
                for host in order:
                    run = run_wrk(port, 50, duration, host=f"{host}.test", path="/hello")
                    runs[host].append(run)
                    progress(f"  wasm: {host:<6} round {rnd + 1}/{rounds} {run['rps']:>9.0f} req/s "
                             f"p50 {run['p50'] * 1e3:6.3f} ms  p99 {run['p99'] * 1e3:6.3f} ms  errors {run['errors']}")
        finally:
            stop_process(proc, 30)
        out = {"scenario": "wasm", "latency": latency, "targets": {}}
        for host, rs in runs.items():
            out["targets"][host] = {"rps": statistics.median(r["rps"] for r in rs),
                                    "p50": statistics.median(r["p50"] for r in rs),
                                    "p99": statistics.median(r["p99"] for r in rs),
                                    "requests": sum(r["requests"] for r in rs), "errors": sum(r["errors"] for r in rs)}
        from .wake import wake_mode

        paused = wake_mode("pause", 5 if args.tiny else 40, progress=lambda *a: None, tiny=args.tiny)
        out["paused"] = {"first_request": paused["first_request"], "awake": paused["awake"]}
        out["rss"] = rss_of_many(tmp, many)
        progress(f"  wasm: {many} services add {out['rss']['added_mib']:.1f} MiB of RSS")
    return out


def markdown(section: dict) -> str:
    lines = ["| target | req/s (50 conns) | p50 ms | p99 ms | requests | failed | sequential p50 ms (p99) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    labels = {"wasm": "wasm handler", "awake": "process, awake"}
    for host, t in section["targets"].items():
        lat = section["latency"][host]
        lines.append(f"| {labels[host]} | {t['rps']:.0f} | {t['p50'] * 1e3:.3f} | {t['p99'] * 1e3:.3f} | "
                     f"{t['requests']} | {t['errors']} | {lat['p50_ms']:.3f} ({lat['p99_ms']:.3f}) |")
    paused = section["paused"]
    lines.append(f"| process, paused (each request wakes it; `bench wake` pause mode) | - | - | - | "
                 f"{paused['first_request']['n']} | 0 | {paused['first_request']['p50']:.3f} "
                 f"({paused['first_request']['p99']:.3f}) |")
    wasm_lat = section["latency"]["wasm"]
    rss = section["rss"]
    lines += ["", f"Wasm instantiate + run (Server-Timing) p50: {wasm_lat.get('instantiate_plus_run_p50_ms', 0):.3f} ms. "
              f"{rss['services']} configured wasm services: RSS {rss['rss_mib_many']:.1f} MiB against "
              f"{rss['rss_mib_one']:.1f} MiB for one (+{rss['added_mib']:.1f} MiB), before any traffic."]
    return "\n".join(lines) + "\n"
