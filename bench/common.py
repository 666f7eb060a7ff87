"""What every benchmark needs: the CPU layout, the Debian tools, ports, processes and wrk.

Shared by ``python -m bench`` (bench/__main__.py) and its scenario modules.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from controller.ports import free_port  # noqa: F401  (one port picker for wakegate, tests and benchmarks)

ROOT = Path(__file__).resolve().parent.parent
PROXY_CPU, LOAD_CPU = "0", "1"
DEBIAN_TOOLS = {"wrk": "wrk", "nginx": "nginx-light", "haproxy": "haproxy", "valgrind": "valgrind"}
HOST = "bench.test"


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in DEBIAN_TOOLS.items() if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench: missing {', '.join(missing)}; install them with: sudo apt-get install {' '.join(missing)}")
    print(f"bench: installing {' '.join(missing)} with apt-get", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"




def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nginx_conf(tmp: Path, name: str, body: str, workers: int = 1) -> Path:
    conf = tmp / f"{name}.conf"
    conf.write_text(
        f"""worker_processes {workers};
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    keepalive_requests 1000000;
{body}
}}
"""
    )
    return conf


def nginx_proxy_conf(tmp: Path, name: str, port: int, backend_port: int, workers: int = 1) -> Path:
    """nginx as the reverse proxy the benchmarks compare with: upstream keep-alive, no buffering."""
    return nginx_conf(tmp, name, f"""
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
        }}
    }}""", workers=workers)


def tree_cpu_seconds(pid: int) -> float:
    """cpu_seconds of a process and all its descendants alive now (a master and its workers)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # it exited meanwhile
            continue
    return total


def start(cmd: list[str], cpu: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", cpu, *cmd], stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen, grace: float = 30.0, sig: int = signal.SIGTERM) -> None:
    """Ask a process to exit (sig, unless None: it was asked already), SIGKILL it after grace seconds."""
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def worker_pid(master: subprocess.Popen) -> int:
    """nginx's single worker (the process doing the work), or the process itself."""
    try:
        children = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
        return int(children[0]) if children else master.pid
    except OSError:
        return master.pid


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    m = re.match(r"([0-9.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(port: int, connections: int, duration: float, host: str = HOST, threads: int = 1,
            cpus: str = LOAD_CPU, path: str = "/", scheme: str = "http", close: bool = False) -> dict:
    """wrk against 127.0.0.1:port (over TLS with scheme "https"; close: a new connection per request)."""
    cmd = [
        "taskset", "-c", cpus, tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
        "-H", f"Host: {host}", f"{scheme}://127.0.0.1:{port}{path}",
    ]
    if close:
        cmd[-1:-1] = ["-H", "Connection: close"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = run.stdout
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"wrk against port {port} gave no result:\n{out}{run.stderr}")
    rps = float(m.group(1))
    total = int(re.search(r"([0-9]+) requests in", out).group(1))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+([0-9]+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    pct = {p: _seconds(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M)}
    return {"rps": rps, "requests": total, "errors": errors, "p50": pct["50"], "p75": pct["75"], "p90": pct["90"],
            "p99": pct["99"]}
