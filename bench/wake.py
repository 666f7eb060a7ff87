"""Wake benchmarks: what the first request to a sleeping service costs, and a 10,000-request burst.

``wake``: per sleep mode, the latency of a request to an awake service, then of
the first request after the service was put to sleep, over many cycles; and a
baseline without wakegate in the same cycle: for ``stop`` the process's own
start-up, for ``snapshot`` a bare restore of the same microVM snapshot (QEMU
launched with ``-incoming``, state loaded, ``cont``, the guest answering).
``burst``: N concurrent connections each send one request to a sleeping
service; every answer is counted, and wakegate's peak RSS read from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "examples" / "backend.py"
GUEST_CACHE = ROOT / ".cache" / "guest"  # make test and make run build the demo guest here
SLEEP_MODES = ("pause", "stop", "snapshot")
sys.path.insert(0, str(ROOT))

from controller.readiness import probe_once  # noqa: E402

from .common import free_port, stop_process  # noqa: E402


def microvm_unavailable() -> str | None:
    """Why the snapshot mode cannot run here, or None."""
    from controller import guest

    if not guest.has_qemu():
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    try:
        guest.build(GUEST_CACHE)
    except guest.GuestBuildError as exc:
        return f"the demo guest cannot be built: {exc}"
    return None


class Gate:
    """A wakegate process with one service: a command (pause, stop) or a microVM (snapshot)."""

    def __init__(self, tmp: Path, mode: str, idle: str = "1h", extra_proxy: str = "") -> None:
        self.mode = mode
        self.port, self.admin_port, self.backend_port = free_port(), free_port(), free_port()
        self.snapshot_dir = tmp / "snapshots"
        self.path = "/" if mode == "snapshot" else "/hello"
        cfg = tmp / f"wake-{mode}.toml"
        command = json.dumps([sys.executable, str(BACKEND), "--port", str(self.backend_port)])
        if mode == "snapshot":  # the demo guest; the first request cold-boots and prepares the snapshot
            how = (f'snapshot_policy = "prepared"\n[services.svc.microvm]\nkernel = "{GUEST_CACHE / "vmlinux"}"\n'
                   f'initrd = "{GUEST_CACHE / "initramfs.cpio"}"\nsnapshot_dir = "{self.snapshot_dir}"\n')
        else:
            how = f"command = {command}\n"
        cfg.write_text(
            f"""[proxy]
listen = "127.0.0.1:{self.port}"
upstream_timeout = "120s"
{extra_proxy}
[admin]
listen = "127.0.0.1:{self.admin_port}"
[log]
server_timing = true
[services.svc]
hosts = ["svc.test"]
upstream = "127.0.0.1:{self.backend_port}"
sleep = "{mode}"
idle_timeout = "{idle}"
wake_timeout = "60s"
max_queue = 100000
{how}"""
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
        """(status, seconds); ``self.exchange`` is the upstream part (connect + head sent to first byte)
        from wakegate's Server-Timing header."""
        started = time.perf_counter()
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: svc.test\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        self.exchange = 0.0
        for line in head.split(b"\r\n"):
            lower = line.lower()
            if lower.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
            elif lower.startswith(b"server-timing:"):
                parts = dict(item.strip().split(b";dur=") for item in line[14:].split(b","))
                self.exchange = (float(parts.get(b"connect", 0)) + float(parts.get(b"upstream", 0))) / 1e3
        await self.reader.readexactly(length)
        return int(head[9:12]), time.perf_counter() - started


async def _wake_cycles(gate: "Gate", cycles: int, progress) -> tuple[list, list, list, list]:
    loop = asyncio.get_running_loop()
    client = await _KeepAlive().open(gate.port)
    await client.request(gate.path)  # first start, not counted
    for _ in range(20 if gate.mode != "snapshot" else 5):  # warm up
        await client.request(gate.path)
    awake, first, resume, ready, startup, exchange = [], [], [], [], [], []
    for i in range(cycles):
        awake.append(min([(await client.request(gate.path))[1] for _ in range(3)]))  # awake, just before this cycle
        if gate.mode == "stop":  # and the process's own start-up, without wakegate, just before too
            startup.append(await loop.run_in_executor(None, _startup_once))
        await loop.run_in_executor(None, gate.put_to_sleep)
        if gate.mode == "snapshot":  # a bare restore of the same snapshot while wakegate's VM is gone
            startup.append(await loop.run_in_executor(None, _bare_restore, gate.snapshot_dir, gate.backend_port))
        status, elapsed = await client.request(gate.path)
        if status != 200:
            raise RuntimeError(f"wake answered {status}")
        s = await loop.run_in_executor(None, gate.service)
        first.append(elapsed)
        exchange.append(client.exchange)
        resume.append(s["last_resume_ms"] / 1e3)
        ready.append(s["last_ready_ms"] / 1e3)
        if (i + 1) % 10 == 0:
            progress(f"  wake {gate.mode}: {i + 1}/{cycles}")
    return awake, first, resume, ready, startup, exchange


def _bare_restore(snapshot_dir: Path, port: int, name: str = "svc") -> tuple[float, float]:
    """QEMU's own restore, without wakegate: launch with -incoming on the snapshot, poll query-status
    every millisecond until loaded, cont, then one GET with a long timeout until the guest answers.
    Returns (launch to cont done, cont done to the first answer) in seconds."""
    meta = json.loads((snapshot_dir / f"{name}.json").read_bytes())
    ours, theirs = socket.socketpair()
    fd = os.open(snapshot_dir / f"{name}.vmstate", os.O_RDONLY)
    started = time.monotonic()
    proc = subprocess.Popen(
        [*meta["argv"], "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control",
         "-serial", "null", "-incoming", f"fd:{fd}"],
        pass_fds=(theirs.fileno(), fd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    theirs.close()
    os.close(fd)
    qmp = ours.makefile("rwb")

    def execute(command: str) -> dict:
        qmp.write(json.dumps({"execute": command}).encode() + b"\n")
        qmp.flush()
        while True:
            reply = json.loads(qmp.readline())
            if "event" not in reply:
                return reply.get("return", reply)

    try:
        ours.settimeout(30)
        qmp.readline()  # greeting
        execute("qmp_capabilities")
        while execute("query-status").get("status") != "paused":
            if time.monotonic() - started > 30:
                raise TimeoutError("bare restore: the snapshot did not load")
            time.sleep(0.001)
        execute("cont")
        resumed = time.monotonic()
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    conn.settimeout(5)
                    if conn.recv(12).startswith(b"HTTP/1."):
                        break
            except OSError:
                pass
            if time.monotonic() - resumed > 30:
                raise TimeoutError("bare restore: the guest did not answer")
            time.sleep(0.001)
        answered = time.monotonic()
        return resumed - started, answered - resumed
    finally:
        try:
            execute("quit")
        except (OSError, ValueError):
            pass
        stop_process(proc, 10, sig=None)  # asked over QMP above
        ours.close()


def wake_mode(mode: str, cycles: int, progress=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="wakegate-wake-") as tmp:
        gate = Gate(Path(tmp), mode)
        try:
            awake, first, resume, ready, startup, exchange = asyncio.run(_wake_cycles(gate, cycles, progress))
        finally:
            gate.stop()
    result = {"mode": mode, "awake": _ms(awake), "first_request": _ms(first), "backend_resume": _ms(resume),
              "readiness_wait": _ms(ready)}
    # Each cycle against the awake request measured right before it: drift between cycles cancels out.
    result["added_over_awake"] = _ms([f - a for f, a in zip(first, awake)])
    result["wakegate_overhead"] = _ms([f - a - r - q for f, a, r, q in zip(first, awake, resume, ready)])
    # The same without the awake subtraction: the first request less the backend's resume, the readiness
    # wait, and the held request's own exchange with the service (connect + upstream, from Server-Timing).
    result["held_exchange"] = _ms(exchange)
    result["wakegate_own"] = _ms([f - r - q - x for f, r, q, x in zip(first, resume, ready, exchange)])
    if mode == "stop":
        result["process_startup"] = _ms(startup)
        result["added_over_startup"] = _ms([f - a - u for f, a, u in zip(first, awake, startup)])
    if mode == "snapshot":
        totals = [launch + answer for launch, answer in startup]
        result["bare_restore"] = {"launch_to_cont": _ms([x[0] for x in startup]),
                                  "cont_to_answer": _ms([x[1] for x in startup]), "total": _ms(totals)}
        # What wakegate adds on top of QEMU's own restore, cycle by cycle: the first request through
        # wakegate, less an awake request (the held request still has to be served), less the bare restore.
        result["added_over_bare_restore"] = _ms([f - a - t for f, a, t in zip(first, awake, totals)])
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
    port = free_port()
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
