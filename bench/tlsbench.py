"""``python -m bench tls``: HTTPS requests/s through wakegate against nginx, with the same certificate
(an RSA 2048 key made here by openssl), on keep-alive connections and with a new connection (a full
handshake) per request, in one alternating run. Layout as ``bench steady``: each proxy on CPU 0 with
one worker, wrk and the backend (nginx, ``return 200``) on CPU 1.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import (HOST, LOAD_CPU, PROXY_CPU, cpu_seconds, free_port, nginx_conf, run_wrk, start, stop_process,
                     tool, wait_port)


def _certificate(tmp: Path) -> tuple[Path, Path]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
                    "cert.pem", "-days", "2", "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=DNS:{HOST}"],
                   cwd=tmp, check=True, capture_output=True, timeout=60)
    (tmp / "key.pem").chmod(0o644)  # nginx's workers run unprivileged
    return tmp / "cert.pem", tmp / "key.pem"


def tls(args, progress=print) -> dict:
    connections = 5 if args.tiny else 50
    with tempfile.TemporaryDirectory(prefix="wakegate-tls-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)
        cert, key = _certificate(tmp)
        backend_port = free_port()
        backend = start([tool("nginx"), "-c", str(nginx_conf(tmp, "backend", f"""
    server {{ listen 127.0.0.1:{backend_port} backlog=4096; location / {{ return 200 "ok"; }} }}"""))],
                        LOAD_CPU, tmp / "backend.log")
        wg_port, wg_tls, ngx_tls = free_port(), free_port(), free_port()
        conf = tmp / "wakegate.toml"
        conf.write_text(f'[proxy]\nlisten = "127.0.0.1:{wg_port}"\nworkers = 1\nupstream_keepalive = 256\n'
                        f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n[tls]\nlisten = "127.0.0.1:{wg_tls}"\n'
                        f'[[tls.certificates]]\ncert = "{cert}"\nkey = "{key}"\n'
                        f'[services.bench]\nhosts = ["{HOST}"]\nupstream = "127.0.0.1:{backend_port}"\n')
        wg = start([sys.executable, "-m", "controller.cli", "serve", "-c", str(conf), "--log-level", "warning"],
                   PROXY_CPU, tmp / "wakegate.log")
        ngx = start([tool("nginx"), "-c", str(nginx_conf(tmp, "proxy", f"""
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{ngx_tls} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto https;
            proxy_buffering off;
        }}
    }}"""))], PROXY_CPU, tmp / "nginx.log")
        targets = {"wakegate": (wg_tls, wg), "nginx": (ngx_tls, ngx)}
        runs = {(name, mode): [] for name in targets for mode in ("keep-alive", "new connection")}
        try:
            for port in (backend_port, wg_tls, ngx_tls):
                wait_port(port, 30)
            order = list(runs)
            for rnd in range(args.rounds):
                shift = rnd % len(order)
                for name, mode in order[shift:] + order[:shift]:
                    port, proc = targets[name]
                    pid = _worker(proc)
                    before = cpu_seconds(pid)
                    run = run_wrk(port, connections, args.duration, scheme="https",
                                  close=mode == "new connection")
                    run["cpu_us_per_request"] = (cpu_seconds(pid) - before) / max(1, run["requests"]) * 1e6
                    runs[(name, mode)].append(run)
                    progress(f"  tls: {name:<8} {mode:<14} round {rnd + 1}/{args.rounds} {run['rps']:>9.0f} req/s "
                             f"p99 {run['p99'] * 1e3:7.3f} ms errors {run['errors']}")
        finally:
            for proc in (wg, ngx, backend):
                stop_process(proc, 20)
    out = {"scenario": "tls", "connections": connections, "modes": {}}
    for mode in ("keep-alive", "new connection"):
        case = {}
        for name in targets:
            rs = runs[(name, mode)]
            case[name] = {"rps": statistics.median(r["rps"] for r in rs), "p99": statistics.median(r["p99"] for r in rs),
                          "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in rs),
                          "errors": sum(r["errors"] for r in rs)}
        case["wakegate_vs_nginx"] = case["wakegate"]["rps"] / case["nginx"]["rps"]
        out["modes"][mode] = case
    return out


def _worker(proc) -> int:
    """nginx's single worker, or wakegate's own process (workers = 1)."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for child in children:
            if "nginx" in Path(f"/proc/{child}/cmdline").read_text():
                return int(child)
    except OSError:
        pass
    return proc.pid


def markdown(section: dict) -> str:
    lines = [f"{section['connections']} connections, 2-byte responses, RSA 2048, one worker each.", "",
             "| connections | wakegate req/s | nginx req/s | wakegate / nginx | wakegate CPU µs/req | nginx CPU µs/req |",
             "| --- | --- | --- | --- | --- | --- |"]
    for mode, case in section["modes"].items():
        wg, ngx = case["wakegate"], case["nginx"]
        lines.append(f"| {mode} | {wg['rps']:.0f} | {ngx['rps']:.0f} | {case['wakegate_vs_nginx']:.2f}x | "
                     f"{wg['cpu_us_per_request']:.1f} | {ngx['cpu_us_per_request']:.1f} |")
    return "\n".join(lines) + "\n"
