"""``python -m bench hostile``: a well-behaved client's latency while attackers lean on wakegate.

One wakegate in front of examples/backend.py and a faulty origin; an attacker process runs every
load issue 10 names at once (slow heads, trickling uploads small and large, pipelined requests
whose answers are never read, floods of requests wakegate answers itself, an origin that floods
1xx, malformed admin requests); meanwhile a polite client asks for /hello, mostly on one
keep-alive connection and every tenth time on a new one. Reported: the polite client's p50/p99/max
and errors, and wakegate's peak RSS. Every loop is bounded by the run's duration; all traffic stays
on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from .common import HOST, ROOT, free_port, stop_process, wait_port

# How hard each attack leans (connections at once); --tiny divides them by 10.
ATTACKS = {
    "slow_heads": 400,  # one header byte a second, forever
    "trickle_small": 200,  # Content-Length 100, one byte a second
    "trickle_large": 40,  # 70 KiB at once, then one byte a second of a 1 MB body
    "unread_local": 20,  # pipelined requests to an unknown host, answers never read
    "unread_upstream": 10,  # pipelined GET /bytes?n=1000000, answers never read
    "interim_flood": 4,  # requests to an origin that sends 10,000 1xx responses each
    "admin_garbage": 4,  # malformed admin requests, one after another
}
POLITE_PAUSE = 0.005  # seconds between the polite client's requests
TARGET_P99 = 0.050  # seconds (issue 10)
TARGET_RSS_MIB = 200


def _config(tmp: Path, port: int, admin: int, backend: int, faulty: int) -> Path:
    conf = tmp / "hostile.toml"
    conf.write_text(f"""[proxy]
listen = "127.0.0.1:{port}"
upstream_max_connections = 64
workers = 1
[admin]
listen = "127.0.0.1:{admin}"
[log]
access = ""
[services.app]
hosts = ["{HOST}"]
upstream = "127.0.0.1:{backend}"
[services.faulty]
hosts = ["faulty.test"]
upstream = "127.0.0.1:{faulty}"
""")
    return conf


# ---- the attacker (a process of its own, asyncio) -----------------------------------


async def _open(port: int):
    return await asyncio.open_connection("127.0.0.1", port)


async def _forever(until: float, make, pause: float = 0.05) -> int:
    """Run make() again and again until the deadline (a refused or reset attempt is just retried)."""
    done = 0
    while time.monotonic() < until:
        try:
            await make()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        done += 1
        await asyncio.sleep(pause)
    return done


async def _drip(port: int, until: float, first: bytes, drop: bytes) -> None:
    """Send first, then one byte a second until the deadline or until wakegate closes."""
    reader, writer = await _open(port)
    try:
        writer.write(first)
        while time.monotonic() < until:
            writer.write(drop)
            await writer.drain()
            await asyncio.sleep(1.0)
            if reader.at_eof():
                return
    finally:
        writer.close()


def _slow_head(port: int, until: float):
    return _drip(port, until, f"GET / HTTP/1.1\r\nHost: {HOST}\r\n".encode(), b"X")


def _trickle(port: int, until: float, size: int, burst: int):
    head = f"POST /count HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {size}\r\n\r\n".encode()
    return _drip(port, until, head + b"x" * burst, b"y")


async def _unread(port: int, until: float, request: bytes) -> None:
    reader, writer = await _open(port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        block = request * 200
        while time.monotonic() < until:
            writer.write(block)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except asyncio.TimeoutError:
                await asyncio.sleep(0.5)  # wakegate stopped reading: as it should
    finally:
        writer.transport.abort()


async def _interim(port: int, until: float) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: faulty.test\r\n\r\n")
        await asyncio.wait_for(reader.read(1 << 20), 5)
    finally:
        writer.close()


async def _admin_garbage(port: int, until: float) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
        await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


async def attack(port: int, admin: int, duration: float, scale: float) -> dict:
    until = time.monotonic() + duration
    n = {name: max(1, int(count * scale)) for name, count in ATTACKS.items()}
    jobs = []
    jobs += [_forever(until, lambda: _slow_head(port, until)) for _ in range(n["slow_heads"])]
    jobs += [_forever(until, lambda: _trickle(port, until, 100, 0)) for _ in range(n["trickle_small"])]
    jobs += [_forever(until, lambda: _trickle(port, until, 1_000_000, 70 * 1024)) for _ in range(n["trickle_large"])]
    unknown = b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n"
    big = f"GET /bytes?n=1000000 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    jobs += [_forever(until, lambda: _unread(port, until, unknown)) for _ in range(n["unread_local"])]
    jobs += [_forever(until, lambda: _unread(port, until, big)) for _ in range(n["unread_upstream"])]
    jobs += [_forever(until, lambda: _interim(port, until), 0.0) for _ in range(n["interim_flood"])]
    jobs += [_forever(until, lambda: _admin_garbage(admin, until), 0.0) for _ in range(n["admin_garbage"])]
    counts = await asyncio.gather(*jobs)
    return {"connections": n, "attempts": sum(counts)}


# ---- the faulty origin and the polite client (threads of the main process) ----------


def faulty_origin(stop: threading.Event) -> int:
    """Answers every request with 10,000 `100 Continue` and then a 200."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    flood = b"HTTP/1.1 100 Continue\r\n\r\n" * 10_000 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while conn.recv(65536):
                    conn.sendall(flood)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
        listener.close()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def polite(port: int, until: float) -> tuple[list[float], int]:
    latencies, errors = [], 0
    request = f"GET /hello HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    sock = None
    i = 0
    while time.monotonic() < until:
        i += 1
        started = time.perf_counter()
        try:
            if sock is None or i % 10 == 0:
                if sock is not None:
                    sock.close()
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(request)
            data = b""
            while not data.endswith(b"hello"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed")
                data += chunk
            if not data.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(data[:40])
            latencies.append(time.perf_counter() - started)
        except OSError:
            errors += 1
            sock = None
        time.sleep(POLITE_PAUSE)
    if sock is not None:
        sock.close()
    return latencies, errors


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def hostile(tmp: Path, duration: float, tiny: bool = False) -> dict:
    """Run the attacks for `duration` seconds with the polite client; the section of the report."""
    stop = threading.Event()
    faulty = faulty_origin(stop)
    backend = subprocess.Popen([sys.executable, str(ROOT / "examples" / "backend.py"), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    backend_port = int(backend.stdout.readline().split()[1])
    port, admin = free_port(), free_port()
    conf = _config(tmp, port, admin, backend_port, faulty)
    log = open(tmp / "hostile-wakegate.log", "wb")
    wakegate = subprocess.Popen([sys.executable, "-m", "controller.cli", "serve", "-c", str(conf), "--log-level",
                                 "warning"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    attacker = None
    try:
        wait_port(port)
        wait_port(admin)
        baseline, _ = polite(port, time.monotonic() + min(2.0, duration / 4))
        rss_start = _rss_mib(wakegate.pid)
        attacker = subprocess.Popen([sys.executable, "-m", "bench.hostile", "attack", str(port), str(admin),
                                     str(duration), "0.1" if tiny else "1"], cwd=ROOT, stdout=subprocess.PIPE)
        time.sleep(min(2.0, duration / 5))  # let the attacks build up
        peak = [rss_start]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.2):
                peak.append(_rss_mib(wakegate.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        latencies, errors = polite(port, time.monotonic() + duration - min(2.0, duration / 5))
        sampling.set()
        sampler.join()
        attacked = json.loads(attacker.communicate(timeout=duration + 60)[0] or b"{}")
        alive = wakegate.poll() is None
    finally:
        stop.set()
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        stop_process(wakegate)
        log.close()
        backend.kill()
        backend.wait()
        backend.stdout.close()
    p99 = _quantile(latencies, 0.99)
    return {
        "duration_seconds": duration,
        "attacks": attacked,
        "baseline": {"requests": len(baseline), "p50_ms": _quantile(baseline, 0.5) * 1e3,
                     "p99_ms": _quantile(baseline, 0.99) * 1e3},
        "polite": {"requests": len(latencies), "errors": errors, "p50_ms": _quantile(latencies, 0.5) * 1e3,
                   "p99_ms": p99 * 1e3, "max_ms": max(latencies, default=float("nan")) * 1e3,
                   "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else float("nan")},
        "rss_mib": {"start": rss_start, "peak": max(peak)},
        "wakegate_alive": alive,
        "targets": {"p99_ms": TARGET_P99 * 1e3, "rss_mib": TARGET_RSS_MIB,
                    "met": p99 <= TARGET_P99 and max(peak) <= TARGET_RSS_MIB and errors == 0 and alive},
    }


def markdown(section: dict) -> str:
    polite_, base, rss = section["polite"], section["baseline"], section["rss_mib"]
    lines = [
        "| | requests | errors | p50 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| polite client, no attack | {base['requests']} | 0 | {base['p50_ms']:.2f} | {base['p99_ms']:.2f} | |",
        f"| polite client, under attack | {polite_['requests']} | {polite_['errors']} | {polite_['p50_ms']:.2f} | "
        f"{polite_['p99_ms']:.2f} | {polite_['max_ms']:.2f} |",
    ]
    attacks = section["attacks"].get("connections", {})
    return ("\n".join(lines) + f"\n\nwakegate RSS {rss['start']:.1f} MiB at the start, {rss['peak']:.1f} MiB at "
            f"the peak; attackers at once: {', '.join(f'{k} {v}' for k, v in attacks.items())} "
            f"({section['attacks'].get('attempts', 0)} attempts). Targets (p99 <= "
            f"{section['targets']['p99_ms']:.0f} ms, RSS <= {section['targets']['rss_mib']} MiB, no errors): "
            f"{'met' if section['targets']['met'] else 'NOT met'}.\n")


if __name__ == "__main__" and sys.argv[1:2] == ["attack"]:
    _port, _admin, _duration, _scale = sys.argv[2:6]
    result = asyncio.run(attack(int(_port), int(_admin), float(_duration), float(_scale)))
    print(json.dumps(result))
