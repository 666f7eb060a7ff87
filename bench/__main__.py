"""``python -m bench``: wakegate against a direct connection, nginx and HAProxy, in one run.

Layout: the backend (nginx, one worker, ``return 200``)
and wrk share CPU 1; the proxy under test has CPU 0 to itself. Targets are run
in rotating order for several rounds; the report gives medians and spread, and
ratios against nginx and HAProxy, since absolute numbers drift on shared hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import (
    HOST,
    LOAD_CPU,
    PROXY_CPU,
    ROOT,
    cpu_seconds,
    ensure_tools,
    free_port,
    nginx_conf,
    nginx_proxy_conf,
    run_wrk,
    start,
    tool,
    wait_port,
    worker_pid,
)

RESULTS = ROOT / "bench" / "results"


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen | None = None  # the process whose CPU is charged to the target
    runs: list[dict] = field(default_factory=list)


def start_wakegate(tmp: Path, name: str, backend_port: int, extra: str = "") -> tuple[int, subprocess.Popen]:
    port = free_port()
    conf = tmp / f"{name}.toml"
    conf.write_text(
        f"""[proxy]
listen = "127.0.0.1:{port}"
upstream_keepalive = 256
workers = 1
[admin]
listen = "127.0.0.1:{free_port()}"
{extra}
[services.bench]
hosts = ["{HOST}"]
upstream = "127.0.0.1:{backend_port}"
"""
    )
    proc = start(
        [sys.executable, "-m", "controller.cli", "serve", "-c", str(conf), "--log-level", "warning"],
        PROXY_CPU,
        tmp / f"{name}.log",
    )
    return port, proc


def setup_targets(tmp: Path, body_bytes: int, measure_cost: bool = False) -> tuple[list[Target], list[subprocess.Popen]]:
    procs = []
    tmp.chmod(0o755)  # nginx workers run unprivileged and must read the payload
    backend_port = free_port()
    if body_bytes <= 1024:  # small: nginx's `return`, no file system work (as in DESIGN.md's runs)
        location = f'return 200 "{"o" * body_bytes}";'
    else:
        (tmp / "www").mkdir()
        (tmp / "www" / "index.html").write_bytes(b"o" * body_bytes)
        location = f"root {tmp / 'www'}; index index.html;"
    backend = start(
        [tool("nginx"), "-c", str(nginx_conf(tmp, "backend", f"""
    server {{
        listen 127.0.0.1:{backend_port} backlog=4096;
        location / {{ {location} }}
    }}"""))],
        LOAD_CPU,
        tmp / "backend.log",
    )
    procs.append(backend)
    wait_port(backend_port)

    if measure_cost:  # the same build, measuring everything against measuring nothing
        on_port, on = start_wakegate(tmp, "wakegate-measured", backend_port,
                                     f'[log]\naccess = "{tmp / "access.log"}"\n[metrics]\nenabled = true')
        met_port, met = start_wakegate(tmp, "wakegate-metrics", backend_port, '[log]\naccess = ""\n[metrics]\nenabled = true')
        off_port, off = start_wakegate(tmp, "wakegate-bare", backend_port, '[log]\naccess = ""\n[metrics]\nenabled = false')
        procs += [on, met, off]
        for port in (on_port, met_port, off_port):
            wait_port(port)
        time.sleep(0.3)
        return [Target("direct", backend_port, backend), Target("measured", on_port, on),
                Target("metrics-only", met_port, met), Target("bare", off_port, off)], procs

    wg_port, wakegate = start_wakegate(tmp, "wakegate", backend_port)
    procs.append(wakegate)

    ngx_port = free_port()
    ngx = start([tool("nginx"), "-c", str(nginx_proxy_conf(tmp, "proxy", ngx_port, backend_port))], PROXY_CPU,
                tmp / "nginx.log")
    procs.append(ngx)

    hap_port = free_port()
    hap_cfg = tmp / "haproxy.cfg"
    hap_cfg.write_text(
        f"""global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
    option forwardfor
frontend fe
    bind 127.0.0.1:{hap_port}
    default_backend be
backend be
    server s1 127.0.0.1:{backend_port}
"""
    )
    hap = start([tool("haproxy"), "-f", str(hap_cfg), "-db"], PROXY_CPU, tmp / "haproxy.log")
    procs.append(hap)
    for port in (wg_port, ngx_port, hap_port):
        wait_port(port)
    time.sleep(0.3)
    targets = [
        Target("direct", backend_port, backend),
        Target("wakegate", wg_port, wakegate),
        Target("nginx", ngx_port, ngx),
        Target("haproxy", hap_port, hap),
    ]
    return targets, procs


def wakegate_build() -> dict:
    """What every wakegate this run starts runs with (the same interpreter, checkout and environment):
    its parser and its warm path, as `wakegate --version` says."""
    out = subprocess.run([sys.executable, "-m", "controller.cli", "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60).stdout.strip()
    match = re.search(r"parser: ([^,)]+)(?:, warm path: ([^)]+))?", out)
    parser_name = match.group(1) if match else "?"
    return {"wakegate": out, "parser": "c" if parser_name == "C extension" else "python",
            "warm_path": (match.group(2) if match and match.group(2) else "python")}


def machine() -> dict:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def version(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **wakegate_build(),
        "nginx": version([tool("nginx"), "-v"]),
        "haproxy": version([tool("haproxy"), "-v"]),
        "wrk": version([tool("wrk"), "-v"]),
    }


def median(values):
    return statistics.median(values) if values else float("nan")


def describe_process(proc, folder: Path) -> str:
    """Whether a target's process still runs, and the tail of every log in the run's folder."""
    state = "no process" if proc is None else (
        "running" if proc.poll() is None else f"exited with status {proc.returncode}")
    logs = "".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-1500:]}\n" for log in sorted(folder.glob("*.log")))
    return f"process: {state}\n{logs}"


def steady(args, measure_cost: bool = False) -> dict:
    scenario = "measure" if measure_cost else "steady"
    results = {"scenario": scenario, "machine": machine(), "settings": vars(args).copy(), "cases": []}
    for body_bytes in args.sizes:
        for connections in args.connections:
            with tempfile.TemporaryDirectory(prefix="wakegate-bench-") as tmpdir:
                targets, procs = setup_targets(Path(tmpdir), body_bytes, measure_cost)
                try:
                    for t in targets:  # warm up pools and caches
                        try:
                            run_wrk(t.port, connections, 1)
                        except RuntimeError as exc:  # say which target, and what its process said
                            raise RuntimeError(f"{t.name}: {exc}\n{describe_process(t.proc, Path(tmpdir))}") from None
                    for rnd in range(args.rounds):
                        order = targets[rnd % len(targets):] + targets[: rnd % len(targets)]
                        for t in order:
                            pid = worker_pid(t.proc) if t.proc else None
                            before = cpu_seconds(pid) if pid else 0.0
                            run = run_wrk(t.port, connections, args.duration)
                            run["cpu_us_per_request"] = (
                                (cpu_seconds(pid) - before) / run["requests"] * 1e6 if pid and run["requests"] else None
                            )
                            t.runs.append(run)
                            print(
                                f"  {body_bytes:>6} B  c={connections:<3} round {rnd + 1}/{args.rounds}  {t.name:<9}"
                                f" {run['rps']:>9.0f} req/s  p50 {run['p50'] * 1e3:6.3f} ms  p99 {run['p99'] * 1e3:6.3f} ms",
                                flush=True,
                            )
                finally:
                    for p in procs:
                        p.send_signal(signal.SIGTERM)
                    for p in procs:
                        try:
                            p.wait(10)
                        except subprocess.TimeoutExpired:
                            p.kill()
                case = {"body_bytes": body_bytes, "connections": connections, "targets": {}}
                for t in targets:
                    rps = [r["rps"] for r in t.runs]
                    case["targets"][t.name] = {
                        "rps": median(rps),
                        "rps_min": min(rps),
                        "rps_max": max(rps),
                        "p50": median([r["p50"] for r in t.runs]),
                        "p75": median([r["p75"] for r in t.runs]),
                        "p90": median([r["p90"] for r in t.runs]),
                        "p99": median([r["p99"] for r in t.runs]),
                        "cpu_us_per_request": median([r["cpu_us_per_request"] for r in t.runs if r["cpu_us_per_request"]]),
                        "errors": sum(r["errors"] for r in t.runs),
                        "runs": t.runs,
                    }
                direct = case["targets"]["direct"]
                for t in case["targets"].values():
                    t["added_p50"] = t["p50"] - direct["p50"]
                if measure_cost:
                    on, met, off = case["targets"]["measured"], case["targets"]["metrics-only"], case["targets"]["bare"]
                    case["measured_vs_bare"] = {"rps": on["rps"] / off["rps"], "cost": 1 - on["rps"] / off["rps"],
                                                "cpu_us_per_request": on["cpu_us_per_request"] - off["cpu_us_per_request"]}
                    case["metrics_only_vs_bare"] = {"rps": met["rps"] / off["rps"], "cost": 1 - met["rps"] / off["rps"],
                                                    "cpu_us_per_request": met["cpu_us_per_request"] - off["cpu_us_per_request"]}
                    results["cases"].append(case)
                    continue
                wg = case["targets"]["wakegate"]
                case["wakegate_vs"] = {
                    other: {"rps": wg["rps"] / case["targets"][other]["rps"], "p99": wg["p99"] / case["targets"][other]["p99"]}
                    for other in ("nginx", "haproxy", "direct")
                }
                results["cases"].append(case)
    return results


def metrics_scrape_times(services: int, scrapes: int = 20) -> dict:
    """GET /metrics with N configured services, a tenth of them with traffic."""
    import urllib.request

    with tempfile.TemporaryDirectory(prefix="wakegate-scrape-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)
        backend_port = free_port()
        backend = start([tool("nginx"), "-c", str(nginx_conf(tmp, "backend", f"""
    server {{ listen 127.0.0.1:{backend_port}; location / {{ return 200 "ok"; }} }}"""))], LOAD_CPU, tmp / "b.log")
        port, admin = free_port(), free_port()
        conf = tmp / "many.toml"
        conf.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\nworkers = 1\n[admin]\nlisten = "127.0.0.1:{admin}"\n' + "".join(
            f'[services.s{i}]\nhosts = ["s{i}.test"]\nupstream = "127.0.0.1:{backend_port}"\n' for i in range(services)))
        wg = start([sys.executable, "-m", "controller.cli", "serve", "-c", str(conf), "--log-level", "warning"],
                   PROXY_CPU, tmp / "wg.log")
        try:
            wait_port(backend_port)
            wait_port(port)
            wait_port(admin)
            for i in range(0, services, 10):
                req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": f"s{i}.test"})
                urllib.request.urlopen(req, timeout=10).read()
            times, size = [], 0
            for _ in range(scrapes):
                started = time.perf_counter()
                size = len(urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=30).read())
                times.append(time.perf_counter() - started)
        finally:
            for p in (wg, backend):
                p.terminate()
                p.wait(10)
    return {"services": services, "with_traffic": services // 10, "p50_ms": median(times) * 1e3,
            "max_ms": max(times) * 1e3, "bytes": size}


def markdown(results: dict) -> str:
    if results["scenario"] == "measure":
        lines = ["| conns | variant | req/s (min-max) | vs bare | cost | extra CPU µs/req |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for case in results["cases"]:
            t = case["targets"]
            lines.append(f"| {case['connections']} | bare (metrics off, no access log) | {t['bare']['rps']:.0f}"
                         f" ({t['bare']['rps_min']:.0f}-{t['bare']['rps_max']:.0f}) | 1 | - | - |")
            for key, label, name in (("metrics_only_vs_bare", "metrics", "metrics-only"),
                                     ("measured_vs_bare", "metrics + access log", "measured")):
                m = case[key]
                lines.append(
                    f"| {case['connections']} | {label} | {t[name]['rps']:.0f} ({t[name]['rps_min']:.0f}-{t[name]['rps_max']:.0f})"
                    f" | {m['rps']:.3f} | {m['cost'] * 100:.1f}% | {m['cpu_us_per_request']:.2f} |"
                )
        s = results["metrics_scrape"]
        lines += ["", f"GET /metrics with {s['services']} services ({s['with_traffic']} with traffic): "
                  f"p50 {s['p50_ms']:.1f} ms, max {s['max_ms']:.1f} ms, {s['bytes']} bytes"]
        counted = results.get("instructions", {})
        if "per_request" in counted:
            lines += ["", f"Instructions per request (callgrind, user space, {counted['requests']} keep-alive requests "
                      "after warm-up; steadier than wall time here):", "",
                      "| variant | instructions per request | vs bare | vs the row above |", "| --- | --- | --- | --- |"]
            previous = None
            for name, value in counted["per_request"].items():
                vs = f"{counted['vs_bare'][name] * 100:+.1f}%" if name in counted["vs_bare"] else "-"
                step = f"{(value / previous - 1) * 100:+.1f}%" if previous else "-"
                lines.append(f"| {name} | {value:,.0f} | {vs} | {step} |")
                previous = value
        elif counted:
            lines += ["", f"Instructions not counted: {counted['not_measured']}."]
        return "\n".join(lines) + "\n"
    if results["scenario"] == "wake":
        from .wake import SEED_FIGURES

        lines = ["| mode | awake p50 ms | first request p50 ms (p99) | added p50 ms | backend resume/start p50 ms |"
                 " readiness p50 ms | wakegate p50 ms | without wakegate p50 ms (resume + answer) |"
                 " added over that p50 ms |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m in results["modes"]:
            bare = m["without_wakegate"]
            lines.append(
                f"| {m['mode']} | {m['awake']['p50']:.3f} | {m['first_request']['p50']:.3f} ({m['first_request']['p99']:.3f})"
                f" | {m['added_over_awake']['p50']:.3f} | {m['backend_resume']['p50']:.3f} | {m['readiness_wait']['p50']:.3f}"
                f" | {m['wakegate_overhead']['p50']:.3f} | {bare['total']['p50']:.3f} ({bare['resume']['p50']:.3f} +"
                f" {bare['to_answer']['p50']:.3f}) | {m['added_over_baseline']['p50']:.3f} |"
            )
        lines.append("")
        lines.append("Without wakegate, in the same cycle while wakegate's service sleeps: pause, a bare cgroup thaw "
                     "of a copy of the service; stop, the process's own start-up; criu-*, `criu restore` of the "
                     "service's image by hand; vm-snapshot, a bare QEMU started ahead with the RAM file mapped and "
                     "`-incoming defer`, timed from migrate-incoming; vm-stream, a bare QEMU launched with "
                     "`-incoming fd:` on the whole stream; vm-pause, QMP cont of a bare paused VM; docker-*, the Engine "
                     "API's unpause or start call on a second container of the same image; runc-stop, `runc run` of a "
                     "second bundle to its first answer. \"resume\" is "
                     "that step, \"answer\" the time from it to the first HTTP answer (polled every 0.2 ms).")
        lines.append("")
        lines.append("wakegate's own part of a wake, measured directly: the first request less the backend's resume, "
                     "the readiness wait and the held request's exchange with the service (Server-Timing): "
                     + ", ".join(f"{m['mode']} {m['wakegate_own']['p50']:.2f} ms p50 ({m['wakegate_own']['p99']:.2f} p99)"
                                 for m in results["modes"]) + ".")
        by_name = {m["mode"]: m for m in results["modes"]}
        lines += ["", "| the seeds reported | their figure | this run, first request p50 (mode) |", "| --- | --- | --- |"]
        for what, figure, mode in SEED_FIGURES:
            ours = f"{by_name[mode]['first_request']['p50']:.1f} ms ({mode})" if mode in by_name else "not measured"
            lines.append(f"| {what} | {figure} | {ours} |")
        return "\n".join(lines) + "\n"
    if results["scenario"] == "burst":
        b = results["burst"]
        return (
            "| requests | 200s | errors | wakes | seconds until all answered | wakegate peak RSS MiB |\n"
            "| --- | --- | --- | --- | --- | --- |\n"
            f"| {b['requests']} | {b['ok']} | {b['errors']} | {b['wakes']} | {b['seconds_until_all_answered']:.2f}"
            f" | {b['peak_rss_mib']:.1f} |\n"
        )
    lines = [
        f"Machine: {results['machine']['cores']} cores, {results['machine']['cpu']}; parser: {results['machine']['parser']}; "
        f"{results['settings']['rounds']} rounds x {results['settings']['duration']} s per target, medians. "
        "Absolute numbers drift 10-20% between runs on shared hosts: compare the ratios.",
        "",
        "| body | conns | target | req/s (min-max) | p50 ms | p99 ms | added p50 ms | CPU µs/req | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in results["cases"]:
        for name, t in case["targets"].items():
            cpu = f"{t['cpu_us_per_request']:.1f}" if t["cpu_us_per_request"] == t["cpu_us_per_request"] else "-"
            lines.append(
                f"| {case['body_bytes']} B | {case['connections']} | {name} | {t['rps']:.0f} ({t['rps_min']:.0f}-{t['rps_max']:.0f})"
                f" | {t['p50'] * 1e3:.3f} | {t['p99'] * 1e3:.3f} | {t['added_p50'] * 1e3:.3f} | {cpu} | {t['errors']} |"
            )
    lines += ["", "| body | conns | wakegate/nginx req/s | wakegate/nginx p99 | wakegate/haproxy req/s | wakegate/haproxy p99 |",
              "| --- | --- | --- | --- | --- | --- |"]
    for case in results["cases"]:
        v = case["wakegate_vs"]
        lines.append(
            f"| {case['body_bytes']} B | {case['connections']} | {v['nginx']['rps']:.2f}x | {v['nginx']['p99']:.2f}x"
            f" | {v['haproxy']['rps']:.2f}x | {v['haproxy']['p99']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def parse_section(tiny: bool) -> dict:
    """bench/test_parse.py under pytest-benchmark: median seconds per head, per parser."""
    with tempfile.TemporaryDirectory(prefix="wakegate-parse-") as tmp:
        out = Path(tmp) / "parse.json"
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_parse.py"), "-q", "-p", "no:cacheprovider",
               "--benchmark-only", "--benchmark-enable", f"--benchmark-json={out}"]
        if tiny:
            cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.05", "--benchmark-warmup=off"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
        data = json.loads(out.read_text())
    medians = {b["name"].removeprefix("test_parse_"): b["stats"]["median"] for b in data["benchmarks"]}
    c = medians.get("c")
    return {"median_seconds": medians,
            "c_vs": {name: value / c for name, value in medians.items() if c and name != "c"}}


def measure_args(args):
    """The measure scenario's settings: the loaded cases of the steady run, small bodies (where the
    per-request work shows), unless a quick or tiny run already chose its one case."""
    if args.quick or args.tiny:
        return args
    chosen = argparse.Namespace(**vars(args))
    chosen.connections, chosen.sizes = [c for c in args.connections if c > 1] or [50], [2]
    return chosen


SCENARIOS = ("steady", "measure", "wake", "cores", "wasm", "tls", "k8s", "burst", "scale", "parse", "hostile")


def run(args) -> dict:
    results = {"scenario": args.scenario, "machine": machine(), "settings": vars(args).copy(), "sections": {}}
    wanted = [s for s in SCENARIOS if s not in args.skip] if args.scenario == "all" else (args.scenario,)
    sections = results["sections"]
    for name in wanted:
        print(f"bench: {name}", flush=True)
        if name == "steady":
            section = steady(args)
        elif name == "measure":  # the costs of measuring: at the steady run's loaded cases, small bodies
            section = steady(measure_args(args), measure_cost=True)
            section["metrics_scrape"] = metrics_scrape_times(100 if args.tiny else 1000)
            from . import instructions

            why = instructions.available()
            if why:
                print(f"bench: instructions not counted: {why}", flush=True)
                section["instructions"] = {"not_measured": why}
            else:
                section["instructions"] = instructions.per_request(200 if args.tiny else 2000,
                                                                   50 if args.tiny else 200)
        elif name == "wake":
            from . import wake

            modes, not_measured = [], {}
            for mode in wake.WAKE_MODES:
                why = wake.unavailable(mode)
                if why:
                    print(f"bench: wake {mode.name}: not measured: {why}", flush=True)
                    not_measured[mode.name] = why
                    continue
                # A microVM cycle takes ~0.5 s plus its bare restore: fewer cycles, still 20 by default.
                cycles = max(2, args.cycles // 2) if mode.slow_cycles else args.cycles
                modes.append(wake.wake_mode(mode, cycles, progress=print, tiny=args.tiny))
            section = {"scenario": "wake", "modes": modes, "not_measured": not_measured}
        elif name == "cores":
            from .cores import cores

            section = cores(args)
        elif name == "wasm":
            from .wasmbench import wasm

            section = wasm(args)
        elif name == "tls":
            from .tlsbench import tls

            section = tls(args)
        elif name == "k8s":
            from .k8s import k8s

            section = k8s(args)
        elif name == "burst":
            from . import wake

            section = {"scenario": "burst", "burst": wake.burst(args.burst)}
        elif name == "scale":
            from .scale import scale

            with tempfile.TemporaryDirectory(prefix="wakegate-scale-") as tmp:
                section = {"scenario": "scale", **scale(Path(tmp), args.services, args.duration, args.rounds)}
        elif name == "hostile":
            from .hostile import hostile

            with tempfile.TemporaryDirectory(prefix="wakegate-hostile-") as tmp:
                section = {"scenario": "hostile", **hostile(Path(tmp), args.hostile_seconds, args.tiny)}
        else:
            section = {"scenario": "parse", **parse_section(args.tiny)}
        sections[name] = section
    return results


def report(results: dict) -> str:
    parts = [f"Machine: {results['machine']['cores']} cores, {results['machine']['cpu']}, Python "
             f"{results['machine']['python']}; wakegate's parser: {results['machine']['parser']}, its warm path: "
             f"{results['machine']['warm_path']}; {results['machine']['nginx']}; "
             f"{results['machine']['haproxy'].split(' - ')[0]}. Absolute numbers drift 10-20% between runs on "
             "shared hosts: read the ratios.\n"]
    for name, section in results["sections"].items():
        parts.append(f"### {name}\n")
        if name == "scale":
            lines = ["| services | start-up s | RSS MiB (start / after traffic) | req/s | vs 1 service |",
                     "| --- | --- | --- | --- | --- |"]
            for e in section["sizes"]:
                lines.append(f"| {e['services']} | {e['startup_seconds']:.2f} | {e['rss_mib_start']:.1f} / "
                             f"{e['rss_mib_after']:.1f} | {e['rps']:.0f} | {e['rps_vs_smallest']:.2f}x |")
            parts.append("\n".join(lines) + "\n")
        elif name == "hostile":
            from .hostile import markdown as hostile_markdown

            parts.append(hostile_markdown(section))
        elif name == "cores":
            from .cores import markdown as cores_markdown

            parts.append(cores_markdown(section))
        elif name == "wasm":
            from .wasmbench import markdown as wasm_markdown

            parts.append(wasm_markdown(section))
        elif name == "tls":
            from .tlsbench import markdown as tls_markdown

            parts.append(tls_markdown(section))
        elif name == "k8s":
            from .k8s import markdown as k8s_markdown

            parts.append(k8s_markdown(section))
        elif name == "parse":
            lines = ["| parser | median µs per head | vs C |", "| --- | --- | --- |"]
            for parser, value in sorted(section["median_seconds"].items(), key=lambda kv: kv[1]):
                lines.append(f"| {parser} | {value * 1e6:.2f} | {section['c_vs'].get(parser, 1.0):.1f}x |")
            parts.append("\n".join(lines) + "\n")
        else:
            parts.append(markdown(section))
            if name == "wake" and section.get("not_measured"):
                parts.append("".join(f"Not measured: {k}: {v}.\n" for k, v in section["not_measured"].items()))
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default="all", choices=("all",) + SCENARIOS)
    parser.add_argument("--quick", action="store_true", help="every scenario, small: about a minute or two")
    parser.add_argument("--pure-python", action="store_true",
                        help="measure wakegate's pure-Python twin (WAKEGATE_PUREPYTHON=1) instead of the C extension")
    parser.add_argument("--skip", default="", help="with all: scenarios to leave out, comma-separated")
    parser.add_argument("--tiny", action="store_true", help="the smallest run that exercises everything (tests)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON, markdown and PNG files")
    parser.add_argument("--cycles", type=int, default=40, help="wake: sleep/wake cycles per mode")
    parser.add_argument("--burst", type=int, default=10000, help="burst: concurrent first requests")
    parser.add_argument("--services", default="1,1000,10000", help="scale: configured services, comma-separated")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hostile-seconds", type=float, default=30.0, help="hostile: seconds under attack")
    parser.add_argument("--connections", default="1,50", help="comma-separated")
    parser.add_argument("--sizes", default="2,65536", help="response body sizes in bytes, comma-separated")
    args = parser.parse_args(argv)
    args.connections = [int(c) for c in args.connections.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.services = [int(s) for s in args.services.split(",")]
    args.skip = [s for s in args.skip.split(",") if s]
    unknown = [s for s in args.skip if s not in SCENARIOS]
    if unknown:
        parser.error(f"--skip: unknown scenarios {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.quick:
        args.duration, args.rounds, args.connections, args.sizes = 3, 2, [50], [2]
        args.cycles, args.burst, args.services = 10, 1000, [1, 1000]
        args.hostile_seconds = 10.0
    if args.tiny:
        args.duration, args.rounds, args.connections, args.sizes = 1, 1, [5], [2]
        args.cycles, args.burst, args.services = 3, 50, [1, 20]
        args.hostile_seconds = 4.0
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs two cores (one for the proxy, one for the load)")
    if args.pure_python:
        os.environ["WAKEGATE_PUREPYTHON"] = "1"  # every wakegate started from here inherits it
    build = wakegate_build()
    if build["parser"] != "c" and not args.pure_python:
        sys.exit(f"bench: wakegate would run its pure-Python twin here ({build['wakegate']}): build the C extension "
                 "(make build), or pass --pure-python to measure the twin on purpose")
    print(f"bench: {build['wakegate']}", flush=True)
    ensure_tools()
    results = run(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = out / f"{args.scenario}-{stamp}"
    from . import plots

    pngs = []
    if "steady" in results["sections"]:
        pngs.append(plots.steady_latency(results["sections"]["steady"], base.with_name(base.name + "-steady.png")))
    if "wake" in results["sections"]:
        pngs.append(plots.wake_breakdown(results["sections"]["wake"], base.with_name(base.name + "-wake.png")))
    results["plots"] = [p.name for p in pngs]
    base.with_suffix(".json").write_text(json.dumps(results, indent=1))
    table = report(results)
    base.with_suffix(".md").write_text(table)
    print()
    print(table)
    failed = [(name, c["body_bytes"], c["connections"], n) for name, sec in results["sections"].items()
              for c in sec.get("cases", []) for n, t in c["targets"].items() if t["errors"]]
    if failed:
        print(f"bench: WARNING: responses other than 2xx/3xx or socket errors in {failed}; those numbers are not comparable")
    print(f"bench: wrote {base}.json, .md and {', '.join(p.name for p in pngs) or 'no plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
