"""Wake benchmarks: what the first request to a sleeping service costs, and a 10,000-request burst.

``wake``: per sleep mode, the latency of a request to an awake service, then of
the first request after the service was put to sleep, over many cycles; and
for ``stop`` the process's own start-up time measured without wakegate.
``burst``: N concurrent connections each send one request to a sleeping
service; every answer is counted, and wakegate's peak RSS read from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "examples" / "backend.py"
sys.path.insert(0, str(ROOT))

from controller.readiness import probe_once  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gate:
    """A wakegate process with one service that has a command."""

    def __init__(self, tmp: Path, mode: str, idle: str = "1h", extra_proxy: str = "") -> None:
        self.mode = mode
        self.port, self.admin_port, self.backend_port = _free_port(), _free_port(), _free_port()
        cfg = tmp / f"wake-{mode}.toml"
        command = json.dumps([sys.executable, str(BACKEND), "--port", str(self.backend_port)])
        cfg.write_text(
            f"""[proxy]
listen = "127.0.0.1:{self.port}"
upstream_timeout = "120s"
{extra_proxy}
[admin]
listen = "127.0.0.1:{self.admin_port}"
[services.svc]
hosts = ["svc.test"]
upstream = "127.0.0.1:{self.backend_port}"
command = {command}
sleep = "{mode}"
idle_timeout = "{idle}"
wake_timeout = "60s"
max_queue = 100000
"""
        )
        self.log = open(tmp / f"wake-{mode}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "serve", "-c", str(cfg), "--log-level", "warning"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        _wait_http(f"http://127.0.0.1:{self.admin_port}/healthz")

    def admin(self, method="GET", path="/services"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def service(self):
        return self.admin()["services"][0]

    def put_to_sleep(self):
        self.admin("POST", "/services/svc/sleep")
        deadline = time.monotonic() + 30
        while self.service()["state"] != "asleep":
            if time.monotonic() > deadline:
                raise TimeoutError("service did not fall asleep")
            time.sleep(0.005)

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def _wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


async def _one_request(port: int, path: str = "/hello") -> tuple[int, float]:
    """One request on a fresh connection: (status, seconds)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    elapsed = time.perf_counter() - started
    status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, elapsed


def _ms(values):
    values = sorted(values)
    if not values:
        return {}
    return {
        "p50": statistics.median(values) * 1e3,
        "p99": values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3,
        "min": values[0] * 1e3,
        "n": len(values),
    }


class _KeepAlive:
    """One keep-alive client connection; request() returns (status, seconds)."""

    async def open(self, port: int):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        return self

    async def request(self, path: str = "/hello") -> tuple[int, float]:
        started = time.perf_counter()
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: svc.test\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await self.reader.readexactly(length)
        return int(head[9:12]), time.perf_counter() - started


async def _wake_cycles(gate: "Gate", cycles: int, progress) -> tuple[list, list, list, list]:
    loop = asyncio.get_running_loop()
    client = await _KeepAlive().open(gate.port)
    await client.request()  # first start, not counted
    for _ in range(20):  # warm up
        await client.request()
    awake, first, resume, ready, startup = [], [], [], [], []
    for i in range(cycles):
        awake.append(min([(await client.request())[1] for _ in range(3)]))  # awake, just before this cycle
        if gate.mode == "stop":  # and the process's own start-up, without wakegate, just before too
            startup.append(await loop.run_in_executor(None, _startup_once))
        await loop.run_in_executor(None, gate.put_to_sleep)
        status, elapsed = await client.request()
        if status != 200:
            raise RuntimeError(f"wake answered {status}")
        s = await loop.run_in_executor(None, gate.service)
        first.append(elapsed)
        resume.append(s["last_resume_ms"] / 1e3)
        ready.append(s["last_ready_ms"] / 1e3)
        if (i + 1) % 10 == 0:
            progress(f"  wake {gate.mode}: {i + 1}/{cycles}")
    return awake, first, resume, ready, startup


def wake_mode(mode: str, cycles: int, progress=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="wakegate-wake-") as tmp:
        gate = Gate(Path(tmp), mode)
        try:
            awake, first, resume, ready, startup = asyncio.run(_wake_cycles(gate, cycles, progress))
        finally:
            gate.stop()
    result = {"mode": mode, "awake": _ms(awake), "first_request": _ms(first), "backend_resume": _ms(resume),
              "readiness_wait": _ms(ready)}
    # Each cycle against the awake request measured right before it: drift between cycles cancels out.
    result["added_over_awake"] = _ms([f - a for f, a in zip(first, awake)])
    result["wakegate_overhead"] = _ms([f - a - r - q for f, a, r, q in zip(first, awake, resume, ready)])
    if mode == "stop":
        result["process_startup"] = _ms(startup)
        result["added_over_startup"] = _ms([f - a - u for f, a, u in zip(first, awake, startup)])
    return result


async def _first_answer(port: int, started: float) -> float:
    """Poll every 0.2 ms (no backoff) until the port answers HTTP: the truest start-up time."""
    while True:
        try:
            await probe_once("127.0.0.1", port, "/", 1.0)
            return time.monotonic() - started
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.0002)
        if time.monotonic() - started > 30:
            raise TimeoutError("backend did not start")


def _startup_once() -> float:
    """The backend's own start-up: spawn to its first answer, with no wakegate involved."""
    port = _free_port()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(BACKEND), "--port", str(port)], stdout=subprocess.DEVNULL)
    try:
        return asyncio.run(_first_answer(port, started))
    finally:
        proc.kill()
        proc.wait()


async def _burst_requests(port: int, n: int) -> tuple[dict, float]:
    sem_open = asyncio.Semaphore(2000)  # connect in waves: the listen backlog is finite

    async def one():
        async with sem_open:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /hello HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n")
            data = await reader.read()
            return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0
        finally:
            writer.close()

    started = time.monotonic()
    statuses = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    elapsed = time.monotonic() - started
    counts: dict = {}
    for s in statuses:
        key = s if isinstance(s, int) else type(s).__name__
        counts[key] = counts.get(key, 0) + 1
    return counts, elapsed


def burst(n: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < n + 100:
        raise SystemExit(f"bench: burst of {n} needs {n + 100} open files, the limit is {hard}")
    with tempfile.TemporaryDirectory(prefix="wakegate-burst-") as tmp:
        gate = Gate(Path(tmp), "stop", extra_proxy='head_timeout = "60s"')
        try:
            counts, elapsed = asyncio.run(_burst_requests(gate.port, n))
            service = gate.service()
            return {
                "requests": n,
                "statuses": {str(k): v for k, v in counts.items()},
                "ok": counts.get(200, 0),
                "errors": n - counts.get(200, 0),
                "wakes": service["wakes"],
                "seconds_until_all_answered": elapsed,
                "peak_rss_mib": gate.peak_rss_kib() / 1024,
            }
        finally:
            gate.stop()
