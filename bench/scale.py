"""Scale: wakegate with 1, 1,000 and 10,000 configured services.

For each size: start-up time (process start to both listeners answering), RSS
after start and after traffic, and steady-state throughput (wrk, 50
connections) to one of the services, against the single-service figure. All
sizes run at once and the load rounds alternate between them, so drift of the
host hits each size alike.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

from .common import LOAD_CPU, PROXY_CPU, free_port, nginx_conf, run_wrk, start, tool, wait_port


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def scale(tmp: Path, sizes: list[int], duration: int, rounds: int, progress=print) -> dict:
    tmp.chmod(0o755)
    backend_port = free_port()
    backend = start([tool("nginx"), "-c", str(nginx_conf(tmp, "scale-backend", f"""
    server {{ listen 127.0.0.1:{backend_port} backlog=4096; location / {{ return 200 "ok"; }} }}"""))],
                    LOAD_CPU, tmp / "scale-backend.log")
    out = {"sizes": []}
    running = []  # (n, port, proc, entry): every size up at once, so the load rounds can alternate
    try:
        wait_port(backend_port)
        for n in sizes:
            port, admin = free_port(), free_port()
            conf = tmp / f"scale-{n}.toml"
            conf.write_text(
                f'[proxy]\nlisten = "127.0.0.1:{port}"\nupstream_keepalive = 256\nworkers = 1\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
                + "".join(f'[services.s{i}]\nhosts = ["s{i}.test"]\nupstream = "127.0.0.1:{backend_port}"\n'
                          for i in range(n))
            )
            started = time.monotonic()
            proc = start([sys.executable, "-m", "controller.cli", "serve", "-c", str(conf), "--log-level", "warning"],
                         PROXY_CPU, tmp / f"scale-{n}.log")
            running.append((n, port, proc, None))
            wait_port(port, timeout=120)
            wait_port(admin, timeout=120)  # the admin listener starts after the proxy's
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=30).read()
            entry = {"services": n, "startup_seconds": time.monotonic() - started,
                     "rss_mib_start": _rss_kib(proc.pid) / 1024, "rps_runs": []}
            running[-1] = (n, port, proc, entry)
            out["sizes"].append(entry)
            run_wrk(port, 50, 1, host=f"s{n - 1}.test")  # warm up
        for rnd in range(rounds):
            order = running[rnd % len(running):] + running[: rnd % len(running)]
            for n, port, proc, entry in order:
                # the last service: a lookup as deep as any
                entry["rps_runs"].append(run_wrk(port, 50, duration, host=f"s{n - 1}.test")["rps"])
        for n, port, proc, entry in running:
            runs = sorted(entry["rps_runs"])
            entry["rps"] = runs[len(runs) // 2]
            entry["rss_mib_after"] = _rss_kib(proc.pid) / 1024
            progress(f"  scale {n:>6} services: start-up {entry['startup_seconds']:.2f} s,"
                     f" RSS {entry['rss_mib_after']:.1f} MiB, {entry['rps']:.0f} req/s")
    finally:
        for _, _, proc, _ in running:
            proc.terminate()
        for _, _, proc, _ in running:
            proc.wait(30)
        backend.terminate()
        backend.wait(10)
    base = out["sizes"][0]["rps"]
    for entry in out["sizes"]:
        entry["rps_vs_smallest"] = entry["rps"] / base
    return out
