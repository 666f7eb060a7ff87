"""Instructions per request, counted by callgrind: the cost of a request path that wall time on a
shared host cannot resolve to a few percent.

wakegate runs under ``valgrind --tool=callgrind``; after a warm-up the counters are zeroed
(``callgrind_control -z``), a fixed number of keep-alive requests is sent, and the counters are
dumped (``-d``). The connections stay open from the warm-up to the dump, so the count is the warm
path's and not the accepting and closing of connections. User-space instructions only: the kernel's
share (syscalls) is not counted. The count includes the timers that run during the window whatever
the traffic (the deadline sweep, the board's heartbeat), between 0.1% and 5% of it in trials here;
subtracting an idle window as long was tried, and added more spread than it took away, since the
timers' count varies that much from one window to the next.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "examples" / "backend.py"
CONNECTIONS = 10  # keep-alive connections the requests are spread over
START_TIMEOUT = 300.0  # Python starting under callgrind takes tens of seconds on these hosts
VARIANTS = {  # name -> the [log] and [metrics] tables
    "bare": '[log]\naccess = ""\n[metrics]\nenabled = false\n',
    "metrics": '[log]\naccess = ""\n[metrics]\nenabled = true\n',
    "metrics + access log": '[log]\naccess = "{log}"\n[metrics]\nenabled = true\n',
}


def available() -> str | None:
    """Why instructions cannot be counted here, or None."""
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install valgrind)"
    return None


def _wait(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port} after {timeout:.0f}s")


class _Clients:
    """CONNECTIONS keep-alive connections, open for the whole count, so that accepting and closing
    them (the Python path) is not counted with the requests."""

    def __init__(self, port: int) -> None:
        self.conns = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(CONNECTIONS)]

    def close(self) -> None:
        for c in self.conns:
            c.close()

    def send(self, n: int) -> int:
        """n GETs (rounded down to whole rounds), one in flight per connection; how many were sent."""
        rounds = max(1, n // CONNECTIONS)
        for _ in range(rounds):
            for c in self.conns:
                c.sendall(b"GET /hello HTTP/1.1\r\nHost: svc.test\r\n\r\n")
            for c in self.conns:
                data = b""
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        raise RuntimeError("the proxy closed a keep-alive connection")
                    data += chunk
                    head, sep, body = data.partition(b"\r\n\r\n")
                    if not sep:
                        continue
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    if len(body) >= length:
                        break
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"unexpected answer: {head[:40]!r}")
        return rounds * CONNECTIONS


def _summary(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary line in {dump}")


def _count(tmp: Path, name: str, table: str, backend_port: int, requests: int, warmup: int) -> float:
    """Instructions per request, counted over `requests` keep-alive requests after `warmup` others."""
    port, admin = free_port(), free_port()
    config = tmp / f"{name.replace(' ', '-').replace('+', 'and')}.toml"
    config.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\nworkers = 1\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
                      + table.format(log=tmp / "access.log")
                      + f'[services.svc]\nhosts = ["svc.test"]\nupstream = "127.0.0.1:{backend_port}"\n')
    out = tmp / f"callgrind.{config.stem}"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", "controller.cli",
         "serve", "-c", str(config), "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def callgrind(flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(proc.pid)], check=True, capture_output=True, timeout=60)

    try:
        _wait(port, proc, START_TIMEOUT)
        clients = _Clients(port)
        try:
            clients.send(warmup)
            callgrind("-z")
            sent = clients.send(requests)
            callgrind("-d")
        finally:
            clients.close()
    finally:
        stop_process(proc, 120)
    dumps = sorted(tmp.glob(f"{out.name}.*"), key=lambda path: int(path.suffix[1:]))
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for {name}")
    return _summary(dumps[0]) / sent


def per_request(requests: int = 2000, warmup: int = 200, progress=print) -> dict:
    """{variant: instructions per request} for bare, metrics, and metrics + access log."""
    with tempfile.TemporaryDirectory(prefix="wakegate-instructions-") as tmp:
        backend_port = free_port()
        backend = subprocess.Popen([sys.executable, str(BACKEND), "--port", str(backend_port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait(backend_port, backend, 30)
            counts = {}
            for name, table in VARIANTS.items():
                counts[name] = _count(Path(tmp), name, table, backend_port, requests, warmup)
                progress(f"  instructions: {name}: {counts[name]:,.0f} per request")
        finally:
            backend.kill()
            backend.wait()
    bare = counts["bare"]
    return {"requests": requests, "per_request": counts,
            "vs_bare": {name: value / bare - 1 for name, value in counts.items() if name != "bare"},
            "parser": os.environ.get("WAKEGATE_PUREPYTHON") and "pure Python" or "C extension"}
