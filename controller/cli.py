"""The ``wakegate`` command: ``serve`` runs the front door, ``check`` validates a config.

Every failure a user can cause ends in one line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import sys

from . import __version__
from .config import ConfigError, load

log = logging.getLogger("wakegate")

EXIT_CONFIG = 2  # as argparse does for bad usage
EXIT_RUNTIME = 1


def _implementation() -> str:
    from proxy.http11 import IMPLEMENTATION
    from proxy.warm import WARM_PATH

    parser = "C extension" if IMPLEMENTATION == "c" else "pure Python"
    return f"{parser}, warm path: {'C' if WARM_PATH == 'c' else 'Python'}"


def make_route(config, svc):
    """One service's route: its upstream pool and its no-wake rules (the seam is set by the caller)."""
    from proxy.server import ServiceRoute
    from proxy.upstream import UpstreamPool

    no_wake = None
    if svc.wakeable and (svc.no_wake.paths or svc.no_wake.user_agents):
        no_wake = (
            tuple(p.encode() for p in svc.no_wake.paths),
            tuple(a.encode() for a in svc.no_wake.user_agents),
            svc.no_wake.status,
        )
    pool = UpstreamPool(svc.upstream.host, svc.upstream.port, config.proxy.upstream_keepalive,
                        config.proxy.upstream_max_connections)
    route = ServiceRoute(svc.name, pool, no_wake=no_wake)
    if svc.wakeable and svc.wait_page:
        route.wait_page_after = svc.wait_page_after
    return route


def build_router(config):
    """The proxy's routing table for a validated config (the caller puts each route's gate on it)."""
    from proxy.routing import Router

    routes = {name: make_route(config, svc) for name, svc in config.services.items()}
    router = Router(routes.get(config.proxy.default_service) if config.proxy.default_service else None)
    for name, svc in config.services.items():
        if svc.hosts:
            router.add(svc.hosts, svc.paths, routes[name])
    return router, routes


def _raise_fd_limit() -> None:
    """Every client connection takes a descriptor, and most take two: lift the soft limit to the hard
    one, as Go's runtime does at start (the default soft limit, 1024, is far too low for a front door)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    log.info("file descriptor limit: %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)


async def serve(config, log_level: str = "info") -> int:
    from .runtime import Runtime

    _raise_fd_limit()
    return await Runtime(config, log_level).run()


def prepare_snapshot(config, name: str) -> int:
    """``wakegate snapshot NAME``: the prepared snapshot a microVM service restores on every wake."""
    svc = config.services.get(name)
    if svc is None:
        print(f"wakegate: {config.path}: no service {name!r}; known: {', '.join(sorted(config.services))}",
              file=sys.stderr)
        return EXIT_CONFIG
    if svc.microvm is None and svc.criu is None:
        print(f"wakegate: {config.path}: services.{name}: has no snapshot to prepare (it needs a "
              f'[services.{name}.microvm] table, or a command with sleep = "snapshot")', file=sys.stderr)
        return EXIT_CONFIG
    import time

    from .controller import make_backend
    from .readiness import NotReady

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        backend = make_backend(svc)
    except RuntimeError as exc:  # CriuError: no usable CRIU
        print(f"wakegate: snapshot {name}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME

    async def run() -> dict:
        started = time.monotonic()
        try:
            meta = await asyncio.wait_for(backend.prepare(started + svc.wake_timeout), svc.wake_timeout + 5)
        finally:
            await backend.stop()
        meta["total_seconds"] = time.monotonic() - started
        return meta

    try:
        meta = asyncio.run(run())
    except (asyncio.TimeoutError, NotReady) as exc:
        where = f"; its console is in {svc.microvm.snapshot_dir}/{name}.serial.log" if svc.microvm else ""
        print(f"wakegate: snapshot {name}: the service did not answer {svc.ready_path} within wake_timeout "
              f"({svc.wake_timeout:g}s): {exc}{where}", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as exc:  # QMPError, RuntimeError, OSError: one line, no traceback
        print(f"wakegate: snapshot {name}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"{meta['path']}: {meta['bytes'] / 1e6:.1f} MB, saved in {meta['save_seconds']:.3f}s "
          f"({meta['total_seconds']:.1f}s with the start)")
    return 0


def _load_or_exit(path: str):
    try:
        return load(path)
    except ConfigError as exc:
        print(f"wakegate: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wakegate", description="A scale-to-zero HTTP/1.1 front door.")
    parser.add_argument("--version", action="store_true", help="print the version and the parser in use")
    sub = parser.add_subparsers(dest="command")
    p_serve = sub.add_parser("serve", help="run the proxy")
    p_serve.add_argument("-c", "--config", required=True, help="path to the TOML config")
    p_serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p_check = sub.add_parser("check", help="validate a config and exit")
    p_check.add_argument("-c", "--config", required=True, help="path to the TOML config")
    p_vm = sub.add_parser("microvm", help="microVM guest assets")
    vm_sub = p_vm.add_subparsers(dest="microvm_command", required=True)
    p_build = vm_sub.add_parser("build", help="build the demo guest (kernel + busybox initramfs) from Debian packages")
    p_build.add_argument("--cache", default=".cache/guest", help="where the kernel and initramfs go")
    p_snap = sub.add_parser("snapshot", help="prepare a microVM service's snapshot: boot, warm up, save")
    p_snap.add_argument("service", help="the service's name in the config")
    p_snap.add_argument("-c", "--config", required=True, help="path to the TOML config")
    args = parser.parse_args(argv)

    if args.version:
        print(f"wakegate {__version__} (parser: {_implementation()})")
        return 0
    if args.command == "check":
        config = _load_or_exit(args.config)
        audits = []  # (what found lines start with, the audit) of what lives outside the file
        if config.discovery.enabled:
            from .discovery import audit

            audits.append(("discovered ", audit(config)))
        if config.kubernetes.enabled:
            from .kube.node import audit as kube_audit

            audits.append(("", kube_audit(config.kubernetes)))
        for prefix, audit_run in audits:
            found, problems = asyncio.run(audit_run)
            for line in found:
                print(f"{args.config}: {prefix}{line}")
            for line in problems:
                print(f"wakegate: {args.config}: {line}", file=sys.stderr)
            if problems:
                for _, later in audits:
                    later.close()  # the coroutines not run
                return EXIT_CONFIG
        print(
            f"{args.config}: ok, {len(config.services)} services, listen {config.proxy.listen}, "
            f"admin {config.admin.listen} (parser: {_implementation()})"
        )
        return 0
    if args.command == "microvm":
        from pathlib import Path

        from .guest import GuestBuildError, build

        try:
            paths = build(Path(args.cache))
        except GuestBuildError as exc:
            print(f"wakegate: microvm build: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
        print(f"kernel {paths['kernel']}\ninitrd {paths['initrd']}")
        return 0
    if args.command == "snapshot":
        config = _load_or_exit(args.config)
        return prepare_snapshot(config, args.service)
    if args.command == "serve":
        config = _load_or_exit(args.config)
        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
        import uvloop

        try:
            return uvloop.run(serve(config, args.log_level))
        except KeyboardInterrupt:
            return 0
    parser.print_help(sys.stderr)
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
