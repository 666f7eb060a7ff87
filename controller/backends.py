"""Backends that can sleep and wake: a process tree, frozen in place or stopped.

``ProcessBackend`` starts a command in its own process group, freezes it
(cgroup v2 ``cgroup.freeze``, cgroup v1 ``freezer.state``, SIGSTOP/SIGCONT as
the last resort) or terminates it, and reports when it exits on its own.
Waking ends with a readiness probe: a real HTTP answer below 500.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from .readiness import ATTEMPT_FIRST, probe_pooled, probe_until_ready

log = logging.getLogger("wakegate.backend")

STOP_GRACE = 5.0  # SIGTERM, then SIGKILL after this; Docker's stop timeout is 10 s, Kubernetes' 30 s
FREEZE_POLL = 0.0005  # cgroup v1 reports FREEZING until every task is stopped; poll this often
FREEZE_TIMEOUT = 2.0  # a freeze that takes longer is given up, and the process is stopped instead
CGROUP_ROOT = Path("/sys/fs/cgroup")
EXIT_POLL = 0.05  # without pidfd_open, how often a child is checked for exit


class Freezer:
    """Freezes and thaws one process tree."""

    name = "none"

    def adopt(self, pid: int) -> None:
        """Put a freshly started process (and so its future children) under this freezer."""

    async def freeze(self) -> None:
        raise NotImplementedError

    async def thaw(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        """Forget the process tree (it has exited)."""


class CgroupV2Freezer(Freezer):
    """cgroup v2: write 1 or 0 to cgroup.freeze; cgroup.events says when it is done."""

    name = "cgroup v2 cgroup.freeze"

    def __init__(self, root: Path, service: str) -> None:
        self.path = root / "wakegate" / service

    @staticmethod
    def available(root: Path) -> bool:
        return (root / "cgroup.controllers").exists() and os.access(root, os.W_OK)

    def adopt(self, pid: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "cgroup.procs").write_text(str(pid))

    async def _set(self, value: str, frozen: str) -> None:
        (self.path / "cgroup.freeze").write_text(value)
        deadline = time.monotonic() + FREEZE_TIMEOUT
        while f"frozen {frozen}" not in (self.path / "cgroup.events").read_text():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path}: cgroup.freeze={value} not done in {FREEZE_TIMEOUT}s")
            await asyncio.sleep(FREEZE_POLL)

    async def freeze(self) -> None:
        await self._set("1", "1")

    async def thaw(self) -> None:
        await self._set("0", "0")

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


class CgroupV1Freezer(Freezer):
    """cgroup v1: FROZEN or THAWED in freezer.state; FREEZING until every task has stopped."""

    name = "cgroup v1 freezer.state"

    def __init__(self, root: Path, service: str) -> None:
        self.path = root / "wakegate" / service

    @staticmethod
    def available(root: Path) -> bool:
        return (root / "freezer.state").exists() or ((root / "cgroup.procs").exists() and os.access(root, os.W_OK))

    def adopt(self, pid: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "cgroup.procs").write_text(str(pid))

    async def freeze(self) -> None:
        state = self.path / "freezer.state"
        state.write_text("FROZEN")
        deadline = time.monotonic() + FREEZE_TIMEOUT
        while state.read_text().strip() != "FROZEN":
            if time.monotonic() > deadline:
                state.write_text("THAWED")
                raise TimeoutError(f"{state}: still FREEZING after {FREEZE_TIMEOUT}s")
            await asyncio.sleep(FREEZE_POLL)

    async def thaw(self) -> None:
        (self.path / "freezer.state").write_text("THAWED")

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


class SignalFreezer(Freezer):
    """The last resort: SIGSTOP and SIGCONT to the process group."""

    name = "SIGSTOP/SIGCONT"

    def __init__(self) -> None:
        self.pgid: int | None = None

    def adopt(self, pid: int) -> None:
        self.pgid = pid

    async def freeze(self) -> None:
        os.killpg(self.pgid, signal.SIGSTOP)

    async def thaw(self) -> None:
        os.killpg(self.pgid, signal.SIGCONT)


def choose_freezer(service: str, cgroup_root: Path = CGROUP_ROOT) -> Freezer:
    """The best freezer this host offers: cgroup v2, then v1, then signals."""
    candidates = []
    if (cgroup_root / "cgroup.controllers").exists():
        candidates.append((CgroupV2Freezer, cgroup_root))  # a pure cgroup v2 host
    candidates.append((CgroupV1Freezer, cgroup_root / "freezer"))
    if (cgroup_root / "unified" / "cgroup.controllers").exists():
        candidates.append((CgroupV2Freezer, cgroup_root / "unified"))  # the v2 half of a hybrid host
    for cls, root in candidates:
        if not cls.available(root):
            continue
        freezer = cls(root, service)
        try:  # prove it: make and remove the service's group
            freezer.path.mkdir(parents=True, exist_ok=True)
            probe = freezer.path / ("cgroup.freeze" if cls is CgroupV2Freezer else "freezer.state")
            if probe.exists() and os.access(probe, os.W_OK):
                return freezer
        except OSError:
            continue
    return SignalFreezer()


def watch_exit(proc: subprocess.Popen, exited: asyncio.Future, loop, on_exit=None) -> None:
    """Resolve ``exited`` with proc's status when it exits (then call ``on_exit(status)``).

    A pidfd becomes readable when the process exits (Linux 5.3+); without one, poll.
    """

    def reap() -> bool:
        if proc.poll() is None:
            return False
        if not exited.done():
            exited.set_result(proc.returncode)
        if on_exit is not None:
            on_exit(proc.returncode)
        return True

    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        async def poll() -> None:
            while not reap():
                await asyncio.sleep(EXIT_POLL)

        loop.create_task(poll())
        return

    def readable() -> None:
        if reap():
            loop.remove_reader(pidfd)
            os.close(pidfd)

    loop.add_reader(pidfd, readable)


class ProcessBackend:
    """A command that serves HTTP on ``address``; sleeps by pausing or stopping it."""

    keeps_connections = True  # overwritten per mode below

    def __init__(self, name: str, command: list[str], *, cwd: str | None, env: dict[str, str] | None,
                 mode: str, host: str, port: int, ready_path: str, ready_timeout: float,
                 freezer: Freezer | None = None) -> None:
        self.name = name
        self.command = command
        self.cwd = cwd
        self.env = env
        self.mode = mode  # "pause" or "stop"
        self.host = host
        self.port = port
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.keeps_connections = mode == "pause"
        self.freezer = freezer if freezer is not None else (choose_freezer(name) if mode == "pause" else SignalFreezer())
        self.proc: subprocess.Popen | None = None
        self.pools: list = []  # the proxy's pools for this address: a thawed process is probed over one
        self.frozen = False
        self._exited: asyncio.Future | None = None
        self.last_resume_seconds: float | None = None  # backend's own part of the last wake
        self.last_ready_seconds: float | None = None  # readiness wait of the last wake
        if mode == "pause":
            log.info("service %s: pause mode freezes with %s", name, self.freezer.name)

    def exited(self) -> asyncio.Future:
        """Resolves when the process exits (on its own or not)."""
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            if self.proc is None:
                self._exited.set_result(None)
        return self._exited

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wake(self, deadline: float) -> None:
        started = time.monotonic()
        thawed = False
        if self.running and self.frozen:
            await self.freezer.thaw()
            self.frozen = False
            thawed = True
        elif not self.running:
            await self._start()
        resumed = time.monotonic()
        self.last_resume_seconds = resumed - started
        if not (thawed and await self._probe_pooled()):
            await probe_until_ready(self.host, self.port, self.ready_path, deadline, self.exited())
        self.last_ready_seconds = time.monotonic() - resumed

    async def _probe_pooled(self) -> bool:
        """A thawed process still holds our keep-alive connections: probe over one of them."""
        for pool in self.pools:
            try:
                status = await probe_pooled(pool, f"{self.host}:{self.port}", self.ready_path, ATTEMPT_FIRST)
            except (OSError, TimeoutError, asyncio.TimeoutError, Exception):
                return False
            if status is not None:
                return status < 500
        return False

    async def _start(self) -> None:
        env = None
        if self.env is not None:
            env = {**os.environ, **self.env}
        # subprocess.Popen spawns with vfork: a few milliseconds less than forking all of wakegate,
        # which is what a cold start's first request waits for.
        try:
            self.proc = proc = subprocess.Popen(
                self.command, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, start_new_session=True
            )
        except OSError as exc:
            raise RuntimeError(f"cannot start {self.command[0]!r}: {exc.strerror or exc}") from None
        self.frozen = False
        loop = asyncio.get_running_loop()
        self._exited = exited = loop.create_future()
        if self.mode == "pause":
            self.freezer.adopt(proc.pid)
        self._watch(proc, exited, loop)
        log.info("service %s: started pid %d: %s", self.name, proc.pid, " ".join(self.command))

    def _watch(self, proc: subprocess.Popen, exited: asyncio.Future, loop) -> None:
        def gone(returncode: int) -> None:
            if self.proc is proc:
                self.frozen = False
                if self.mode == "pause":
                    self.freezer.remove()

        watch_exit(proc, exited, loop, gone)

    async def sleep(self) -> None:
        if not self.running:
            return
        if self.mode == "pause":
            await self.freezer.freeze()
            self.frozen = True
        else:
            await self.stop()

    async def stop(self) -> None:
        """Terminate the process group: SIGTERM, then SIGKILL after STOP_GRACE."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        pgid = proc.pid
        try:
            if self.frozen:
                os.killpg(pgid, signal.SIGTERM)
                await self.freezer.thaw()  # a frozen process cannot act on SIGTERM
                self.frozen = False
            else:
                os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        exited = self.exited()
        try:
            await asyncio.wait_for(asyncio.shield(exited), STOP_GRACE)
        except asyncio.TimeoutError:
            log.warning("service %s: pid %d ignored SIGTERM for %.0fs; killing", self.name, pgid, STOP_GRACE)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await exited
        try:  # stragglers left in the group
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
