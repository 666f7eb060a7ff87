"""``python -m bench cores``: wakegate with 1..CPUs proxy workers against nginx with as many worker
processes, each given the same CPUs, in one alternating run; and the pause-mode wake overhead with
two workers beside one.

Layout: with N workers the proxy under test may run on CPUs 0..N-1. Where N is every CPU of the
host (2 on these machines), wrk and the backend (nginx, one worker, ``return 200``) share those
CPUs with it: the report says so, and the ratios (wakegate against nginx with the same N) are what
to read. CPU time per request counts the proxy's whole process tree (controller or master, and
workers), user and system.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from .common import (HOST, free_port, nginx_conf, nginx_proxy_conf, run_wrk, start, stop_process, tool,
                     tree_cpu_seconds, wait_port)


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _start_pair(tmp: Path, workers: int, backend_port: int) -> dict:
    cpus = ",".join(str(c) for c in _cpus()[:workers])
    wg_port, admin = free_port(), free_port()
    conf = tmp / f"wakegate-{workers}.toml"
    conf.write_text(f'[proxy]\nlisten = "127.0.0.1:{wg_port}"\nupstream_keepalive = 256\nworkers = {workers}\n'
                    f'[admin]\nlisten = "127.0.0.1:{admin}"\n[log]\naccess = ""\n[metrics]\nenabled = true\n'
                    f'[services.bench]\nhosts = ["{HOST}"]\nupstream = "127.0.0.1:{backend_port}"\n')
    wg = start([sys.executable, "-m", "controller.cli", "serve", "-c", str(conf), "--log-level", "warning"], cpus,
               tmp / f"wakegate-{workers}.log")
    ngx_port = free_port()
    ngx = start([tool("nginx"), "-c", str(nginx_proxy_conf(tmp, f"proxy-{workers}", ngx_port, backend_port, workers))],
                cpus, tmp / f"nginx-{workers}.log")
    wait_port(wg_port, 30)
    wait_port(ngx_port)
    return {"wakegate": (wg_port, wg), "nginx": (ngx_port, ngx), "cpus": cpus}


def throughput(workers_list: list[int], connections: int, duration: float, rounds: int, progress=print) -> dict:
    """{workers: {target: medians}} and the ratios, from one alternating run."""
    cpus = _cpus()
    load_cpus = ",".join(map(str, cpus))  # wrk and the backend may use every CPU: see the module's contract
    with tempfile.TemporaryDirectory(prefix="wakegate-cores-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)
        backend_port = free_port()
        backend = start([tool("nginx"), "-c", str(nginx_conf(tmp, "backend", f"""
    server {{ listen 127.0.0.1:{backend_port} backlog=4096; location / {{ return 200 "ok"; }} }}"""))],
                        load_cpus, tmp / "backend.log")
        pairs = {}
        try:
            wait_port(backend_port)
            for n in workers_list:
                pairs[n] = _start_pair(tmp, n, backend_port)
            time.sleep(0.5)
            runs = {(n, name): [] for n in workers_list for name in ("wakegate", "nginx")}
            for (n, name) in runs:  # warm up pools and caches
                run_wrk(pairs[n][name][0], connections, 1, threads=max(workers_list), cpus=load_cpus)
            order = list(runs)
            for rnd in range(rounds):
                shift = rnd % len(order)
                for n, name in order[shift:] + order[:shift]:
                    port, proc = pairs[n][name]
                    before = tree_cpu_seconds(proc.pid)
                    run = run_wrk(port, connections, duration, threads=max(workers_list), cpus=load_cpus)
                    run["cpu_us_per_request"] = (tree_cpu_seconds(proc.pid) - before) / max(1, run["requests"]) * 1e6
                    runs[(n, name)].append(run)
                    progress(f"  cores: workers={n} {name:<8} round {rnd + 1}/{rounds} {run['rps']:>9.0f} req/s "
                             f"{run['cpu_us_per_request']:6.1f} µs CPU/req  p99 {run['p99'] * 1e3:6.3f} ms")
        finally:
            for pair in pairs.values():
                for key in ("wakegate", "nginx"):
                    stop_process(pair[key][1], 30)
            stop_process(backend, 10)
    from statistics import median

    out = {"cpus": len(cpus), "connections": connections, "load_shares_cpus": max(workers_list) >= len(cpus),
           "by_workers": {}}
    for n in workers_list:
        entry = {}
        for name in ("wakegate", "nginx"):
            rs = runs[(n, name)]
            entry[name] = {"rps": median(r["rps"] for r in rs), "p50": median(r["p50"] for r in rs),
                           "p99": median(r["p99"] for r in rs),
                           "cpu_us_per_request": median(r["cpu_us_per_request"] for r in rs),
                           "errors": sum(r["errors"] for r in rs), "runs": rs}
        entry["wakegate_vs_nginx"] = entry["wakegate"]["rps"] / entry["nginx"]["rps"]
        out["by_workers"][n] = entry
    one = out["by_workers"][workers_list[0]]
    for n in workers_list:
        e = out["by_workers"][n]
        e["cpu_per_request_vs_one_worker"] = e["wakegate"]["cpu_us_per_request"] / one["wakegate"]["cpu_us_per_request"]
        e["rps_vs_one_worker"] = {name: e[name]["rps"] / one[name]["rps"] for name in ("wakegate", "nginx")}
        e["ratio_vs_single_worker_ratio"] = e["wakegate_vs_nginx"] / one["wakegate_vs_nginx"]
    return out


def wake_overhead(cycles: int, tiny: bool, progress=print) -> dict:
    """Pause-mode wakes through one worker and through two: what the first request adds over an awake one."""
    from .wake import wake_mode

    out = {}
    for workers in (1, 2):
        result = wake_mode("pause", cycles, progress=progress, tiny=tiny, workers=workers)
        out[workers] = {"added_over_awake": result["added_over_awake"], "wakegate_own": result["wakegate_own"],
                        "awake": result["awake"], "first_request": result["first_request"]}
    return out


def cores(args, progress=print) -> dict:
    counts = list(range(1, len(_cpus()) + 1))
    section = {"scenario": "cores", **throughput(counts, 50 if not args.tiny else 5, args.duration, args.rounds, progress)}
    section["wake"] = wake_overhead(args.cycles, args.tiny, progress)
    return section


def markdown(section: dict) -> str:
    lines = [f"{section['cpus']} CPUs, {section['connections']} connections, 2-byte responses, metrics on."
             + (" With every CPU given to the proxies, wrk and the backend share them: read the ratios."
                if section["load_shares_cpus"] else ""), "",
             "| workers | wakegate req/s | nginx req/s | wakegate/nginx | vs 1-worker ratio | wakegate CPU µs/req "
             "(vs 1 worker) | nginx CPU µs/req | wakegate p99 ms | nginx p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, e in section["by_workers"].items():
        wg, ngx = e["wakegate"], e["nginx"]
        lines.append(f"| {n} | {wg['rps']:.0f} | {ngx['rps']:.0f} | {e['wakegate_vs_nginx']:.2f}x | "
                     f"{e['ratio_vs_single_worker_ratio']:.2f} | {wg['cpu_us_per_request']:.1f} "
                     f"({e['cpu_per_request_vs_one_worker']:.2f}x) | {ngx['cpu_us_per_request']:.1f} | "
                     f"{wg['p99'] * 1e3:.2f} | {ngx['p99'] * 1e3:.2f} |")
    lines += ["", "| pause-mode wake | awake p50 ms | first request p50 ms | added over awake p50 ms | "
              "wakegate's own p50 ms |", "| --- | --- | --- | --- | --- |"]
    for n, w in section["wake"].items():
        lines.append(f"| workers = {n} | {w['awake']['p50']:.3f} | {w['first_request']['p50']:.3f} | "
                     f"{w['added_over_awake']['p50']:.3f} | {w['wakegate_own']['p50']:.3f} |")
    return "\n".join(lines) + "\n"

