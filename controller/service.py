"""One service's life cycle (ASLEEP, WAKING, READY, SLEEPING, FAILED) and the seam to it.

The request path calls ``acquire()`` and later ``lease.release()``; it only reads state. Every
state change is made by the service's supervisor task, its single writer, and only through the
table SERVICE_TRANSITIONS. The supervisor wakes the backend, probes readiness, releases held
requests in arrival order, puts the service to sleep when it has been idle, and stops the backend
itself after a failure, so a wake never overlaps a stop. An exception inside it fails that step
(held requests get 503), is logged once with its traceback, and leaves the service usable.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import Callable, NamedTuple, Protocol

from proxy import board as published
from proxy.gate import Gate
from proxy.metrics import Histogram
from proxy.seam import Refused

log = logging.getLogger("wakegate.controller")

MAX_QUEUE = 10_000  # held requests per service, across all workers; Knative activator's queue depth
FAILED_BACKOFF_MIN = 1.0  # first backoff after a failed wake, seconds; doubles per failure
FAILED_BACKOFF_MAX = 30.0  # ceiling of that backoff; Kubernetes' CrashLoopBackOff starts at 10 s, caps at 5 min
STABLE_SECONDS = 60.0  # a backend that ran this long before exiting did not crash-loop; Kubernetes resets its
                       # backoff after 10 min of running, shorter here since idle services sleep in minutes
# On shutdown an awake service is put to sleep in its mode first (a stateful snapshot keeps its state
# across restarts), within this; then it is stopped whatever happened. systemd's stop timeout is 90 s.
CLOSE_SLEEP_TIMEOUT = 20.0
SLEEP_DRAIN_TIMEOUT = 30.0  # a sleep waits this long for in-flight requests; Kubernetes' termination grace is 30 s
SLEEP_DRAIN_POLL = 0.002  # how often that wait looks


class State(enum.Enum):
    ASLEEP = "asleep"
    WAKING = "waking"
    READY = "ready"
    SLEEPING = "sleeping"
    FAILED = "failed"


ASLEEP, WAKING, READY, SLEEPING, FAILED = State.ASLEEP, State.WAKING, State.READY, State.SLEEPING, State.FAILED
# What the board publishes for each state (proxy/board.py): workers read these codes.
PUBLISHED = {state: published.STATE_NAMES.index(state.value) for state in State}

# Every transition of the life cycle, in one place: state -> {event: next state}.
SERVICE_TRANSITIONS: dict[State, dict[str, State]] = {
    ASLEEP: {"wake": WAKING},
    WAKING: {"ready": READY, "fail": FAILED},
    READY: {"sleep": SLEEPING, "fail": FAILED},
    SLEEPING: {"slept": ASLEEP, "fail": FAILED},
    FAILED: {"retry": ASLEEP},
}


class IllegalTransition(RuntimeError):
    """The supervisor asked for a move the life-cycle table does not allow (a bug, never input)."""


class SnapshotStats(NamedTuple):
    """What a backend that sleeps as a snapshot reports for the metrics."""

    starts: dict  # kind (cold, restore, cont) -> count
    snapshot_bytes: int  # the snapshot on disk now (0: none)
    saves: int
    save_seconds: Histogram  # writing one
    resident_bytes: int = 0  # of snapshot_bytes, held in memory (page cache or tmpfs)
    phases: dict | None = None  # (kind, "resume" or "ready") -> Histogram of that part of a wake


def record_start(phases: dict, kind: str, resume_seconds: float, ready_seconds: float) -> None:
    """Add one wake of this kind (cold, restore, cont) to a backend's per-kind phase histograms."""
    for phase, seconds in (("resume", resume_seconds), ("ready", ready_seconds)):
        hist = phases.get((kind, phase))
        if hist is None:
            hist = phases[(kind, phase)] = Histogram()
        hist.observe(seconds)


class Backend(Protocol):
    """What every backend (process, microVM, ...) offers the supervisor."""

    mode: str  # the sleep mode: "pause", "stop", "snapshot"
    keeps_connections: bool  # pooled upstream connections survive a sleep
    last_resume_seconds: float | None  # the backend's own part of the last wake
    last_ready_seconds: float | None  # the readiness wait of the last wake
    # Set by Service: a backend that learns its service was started by someone else while asleep
    # (a container started by hand) calls it; the service then wakes without starting anything.
    started_elsewhere: Callable[[], None] | None

    async def wake(self, deadline: float) -> None:
        """Run the service and return once it answers its readiness probe (or raise)."""

    async def sleep(self) -> None:
        """Put the running service to sleep in this backend's mode."""

    async def stop(self) -> None:
        """End the service entirely (idempotent; waits for it to be gone)."""

    def exited(self) -> asyncio.Future:
        """Resolves when the running service exits, on its own or not."""

    def describe(self) -> dict:
        """Facts for the admin API: at least ``pid`` (None when not running)."""

    def snapshot_stats(self) -> SnapshotStats | None:
        """Starts by kind and the snapshot's size and saves; None for a backend without snapshots."""

    def prepare_next_wake(self) -> None:
        """While asleep, start in the background what makes the next wake faster (a standby VMM);
        returns at once. Most backends have nothing to do."""

    async def close(self) -> None:
        """wakegate is exiting, after stop(): let go of what outlives a service (an Engine's
        connection and events stream). Most backends hold nothing."""


class Service:
    """A service's state and its supervisor, the single writer of that state, which it publishes
    on the board (proxy/board.py); the proxy's gates read it there and ask for wakes."""

    def __init__(self, name: str, backend: Backend | None, *, idle_timeout: float | None, wake_timeout: float,
                 max_queue: int = MAX_QUEUE, pools=(), on_state: Callable | None = None,
                 board=None, slot: int = 0, local_worker: int | None = 0) -> None:
        self.name = name
        self.backend = backend  # None: always up, nothing to wake
        self.idle_timeout = idle_timeout
        self.wake_timeout = wake_timeout
        self.max_queue = max_queue
        self.pools = list(pools)  # upstream pools to flush when the process goes away
        self.on_state = on_state  # observer (metrics, logs); never writes state
        self.board = board if board is not None else published.local_board(1)
        self.slot = slot
        self.board.clear(slot)
        # Who hears the answer to a wake: callables (service, refused or None). The local gate's
        # answer is one; the controller adds one that tells every worker process.
        self.listeners: list[Callable] = []
        self.gate: Gate | None = None  # this process's own gate (one process: the proxy's seam)
        if local_worker is not None:
            self.gate = Gate(name, self.board, slot, local_worker, max_queue=max_queue, wake_timeout=wake_timeout,
                             ask=lambda gate: self.ask())
            self.listeners.append(lambda service, refused: self.gate.answer(refused))
        self.state = ASLEEP
        self.wanted = False  # a gate holds requests and asked for a wake that has not been answered
        self.wake_after: asyncio.Future | None = None  # a predecessor (reload) that must be gone first
        self.ready_since = 0.0
        self.wakes = 0
        self.sleeps = 0
        self.failures = 0
        self.last_failure = ""  # why the last wake failed (what held requests were told)
        self.last_wake_seconds: float | None = None
        self.wake_results: dict[str, int] = {}  # ok, failed, timeout, error
        self.sleep_reasons: dict[str, int] = {}  # idle, admin, exited
        self.wake_seconds = Histogram()  # decision to ready
        self.resume_seconds = Histogram()  # the backend's own thaw or start
        self.ready_seconds = Histogram()  # the readiness wait after it
        self._failed_until = 0.0
        self.failures_in_a_row = 0  # failed wakes and quick exits since the last good stretch
        self._commands: asyncio.Queue | None = None
        self._kick: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        if backend is None:
            self.state = READY  # always up: published as such, never changes
        else:
            backend.started_elsewhere = self._started_elsewhere
        self._publish()

    # ---- what the board says (every proxy process writes its own counts there) ----

    @property
    def in_flight(self) -> int:
        return self.board.totals(self.slot)[0]

    @property
    def tunnels(self) -> int:
        return self.board.totals(self.slot)[1]

    @property
    def queued(self) -> int:
        """Held requests across every proxy process."""
        return self.board.totals(self.slot)[2]

    @property
    def idle_since(self) -> float:
        """The last release of a request, or becoming ready if later (monotonic seconds)."""
        return max(self.ready_since, self.board.totals(self.slot)[3] / 1e9)

    @property
    def failed_until(self) -> float:
        """Until when (monotonic seconds) a FAILED service refuses at once; published with the state."""
        return self._failed_until

    @failed_until.setter
    def failed_until(self, value: float) -> None:
        self._failed_until = value
        self._publish()

    def _publish(self) -> None:
        self.board.publish(self.slot, PUBLISHED[self.state], int(self._failed_until * 1e9))

    # ---- the seam in one process (the proxy's gate), and the wake ask from any gate ----

    @property
    def awake(self) -> bool:
        """A request now would be served without a wake."""
        return self.state is READY

    def acquire(self):
        """This process's gate: a granted lease when READY, else a held one, or raise Refused."""
        return self.gate.acquire()

    def ask(self) -> None:
        """A gate holds requests for this service: wake it, and answer every listener once it is
        READY or has failed. Answered at once when it is READY already (the ask crossed the answer)."""
        if self.state is READY:
            self._answer(None)
            return
        if self._closing:
            self._answer(Refused(503, "wakegate is shutting down", 1.0))
            return
        self.wanted = True
        self._wake_supervisor()

    def _answer(self, refused: Refused | None) -> None:
        self.wanted = False
        for listener in list(self.listeners):
            try:
                listener(self, refused)
            except Exception:
                log.exception("service %s: answering a wake failed", self.name)

    # ---- commands from the admin API and the idle ticker ----

    def request_wake(self) -> None:
        self._command("wake")

    def request_idle_check(self) -> None:
        """The idle timeout changed (a reload): look again now."""
        if self._kick is not None:
            self._kick.set()

    def request_sleep(self, reason: str = "admin") -> None:
        self._command("sleep:" + reason)

    def _command(self, command: str) -> None:
        if self.backend is None or self._closing:
            return
        self._ensure_supervisor()
        self._commands.put_nowait(command)
        self._kick.set()

    def _started_elsewhere(self) -> None:
        if self.state is ASLEEP:
            self._command("wake")  # the backend finds it running: no start, a readiness probe

    def _wake_supervisor(self) -> None:
        self._ensure_supervisor()
        self._kick.set()

    def _ensure_supervisor(self) -> None:
        if self._task is None or self._task.done():
            if self._kick is None:
                self._kick = asyncio.Event()
                self._commands = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"service-{self.name}")

    # ---- the single writer ----

    def _set(self, event: str) -> None:
        """Move by the table; the observer may not break the writer."""
        old = self.state
        new = SERVICE_TRANSITIONS[old].get(event)
        if new is None:
            raise IllegalTransition(f"service {self.name}: event {event!r} in state {old.value}")
        self.state = new
        self._publish()
        log.info("service %s: %s -> %s", self.name, old.value, new.value)
        if self.on_state is not None:
            try:
                self.on_state(self, old, new)
            except Exception:
                log.exception("service %s: state observer failed", self.name)

    async def _supervise(self) -> None:
        while not self._closing:
            try:
                if not await self._step():
                    return  # nothing to do: the task ends; acquire() or a command starts another
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("service %s: supervisor failed in state %s", self.name, self.state.value)
                await self._recover(exc)

    async def _step(self) -> bool:
        """One step of the life cycle; False when the supervisor may end."""
        state = self.state
        if state is ASLEEP:
            if not self.wanted and not self._take_command("wake"):
                return await self._wait(None)
            await self._do_wake()
        elif state is READY:
            reason = await self._wait_while_ready()
            if reason:
                await self._do_sleep(reason)
        elif state is FAILED:
            delay = self.failed_until - time.monotonic()
            if delay > 0:
                await self._wait(delay)
                return True
            self._set("retry")
        else:  # WAKING and SLEEPING live only inside _do_wake / _do_sleep
            raise IllegalTransition(f"service {self.name}: supervisor found {state.value} between steps")
        return True

    async def _recover(self, exc: Exception) -> None:
        """A step raised: fail whatever it was doing, stop the backend, stay usable."""
        if self.state is ASLEEP and self.wanted:
            self._set("wake")  # the wake's own first step failed: its held requests must hear of it
        if self.state in (WAKING, READY, SLEEPING):
            self._count(self.wake_results, "error")
            self._fail(503, f"internal error ({type(exc).__name__})")
            await self._stop_backend()
        else:
            self._answer(Refused(503, "internal error", FAILED_BACKOFF_MIN))

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for a kick (True) or the timeout (False)."""
        self._kick.clear()
        if self.wanted or not self._commands.empty():
            return True
        try:
            await asyncio.wait_for(self._kick.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _take_command(self, wanted: str) -> bool:
        """Drop queued commands; report whether one starting with wanted was among them."""
        found = False
        while not self._commands.empty():
            if self._commands.get_nowait().startswith(wanted):
                found = True
        return found

    async def _wait_while_ready(self) -> str | None:
        """Stay READY until idle long enough, told to sleep, or the backend exits."""
        exited = self.backend.exited()
        while True:
            while not self._commands.empty():
                command = self._commands.get_nowait()
                if command.startswith("sleep:"):
                    return command[6:]
            if exited.done():
                return "exited"
            if time.monotonic() - self.ready_since >= STABLE_SECONDS:
                self.failures_in_a_row = 0  # a good stretch: the next failure starts the backoff afresh
            if self.idle_timeout is None:
                timeout = None
            elif self.in_flight:
                timeout = self.idle_timeout  # a release does not kick: look again then
            else:
                timeout = self.idle_since + self.idle_timeout - time.monotonic()
                if timeout <= 0:
                    return "idle"
            if self.failures_in_a_row:
                stable_in = self.ready_since + STABLE_SECONDS - time.monotonic()
                timeout = stable_in if timeout is None else min(timeout, stable_in)
            self._kick.clear()
            kick = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait({kick, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                kick.cancel()

    async def _do_wake(self) -> None:
        self._take_command("wake")
        self._set("wake")
        started = time.monotonic()
        deadline = started + self.wake_timeout
        if self.wake_after is not None:  # the service it replaces is still draining: wait for its stop
            await asyncio.wait({self.wake_after}, timeout=self.wake_timeout)
            self.wake_after = None
        try:
            await asyncio.wait_for(self.backend.wake(deadline), self.wake_timeout)
        except asyncio.TimeoutError:
            self._count(self.wake_results, "timeout")
            self._fail(504, "wake timed out")
            await self._stop_backend()
            return
        except Exception as exc:
            if getattr(exc, "timed_out", False):  # the readiness probe reached the same deadline first
                self._count(self.wake_results, "timeout")
                self._fail(504, "wake timed out")
            else:
                log.warning("service %s: wake failed: %s", self.name, exc)
                self._count(self.wake_results, "failed")
                self._fail(503, f"wake failed: {exc}")
            await self._stop_backend()
            return
        now = time.monotonic()
        self.last_wake_seconds = now - started
        self._count(self.wake_results, "ok")
        self.wake_seconds.observe(self.last_wake_seconds)
        backend = self.backend
        if backend.last_resume_seconds is not None:
            self.resume_seconds.observe(backend.last_resume_seconds)
        if backend.last_ready_seconds is not None:
            self.ready_seconds.observe(backend.last_ready_seconds)
        self.wakes += 1
        self.ready_since = now
        self._set("ready")
        self._answer(None)

    def _fail(self, status: int, reason: str) -> None:
        """Into FAILED with a backoff that doubles per failure in a row; held requests are refused."""
        self.failures += 1
        self.failures_in_a_row += 1
        backoff = min(FAILED_BACKOFF_MIN * 2 ** (self.failures_in_a_row - 1), FAILED_BACKOFF_MAX)
        self.failed_until = time.monotonic() + backoff
        self.last_failure = reason
        self._set("fail")
        self._answer(Refused(status, reason, backoff))

    async def _stop_backend(self) -> None:
        """Stop the backend, in the supervisor itself: the next wake starts only once it is gone."""
        try:
            await self.backend.stop()
        except Exception as exc:
            log.warning("service %s: stopping it failed: %s", self.name, exc)
        for pool in self.pools:
            pool.close_idle()

    async def _do_sleep(self, reason: str) -> None:
        self._set("sleep")  # from here new requests are held; the ones in flight finish first
        mode = self.backend.mode
        quick_exit = reason == "exited" and time.monotonic() - self.ready_since < STABLE_SECONDS
        if reason != "exited" and self.in_flight:
            deadline = time.monotonic() + SLEEP_DRAIN_TIMEOUT
            while self.in_flight and time.monotonic() < deadline and not self.backend.exited().done():
                await asyncio.sleep(SLEEP_DRAIN_POLL)
            if self.in_flight:
                log.warning("service %s: sleeping with %d requests still in flight", self.name, self.in_flight)
        try:
            if reason == "exited":
                log.warning("service %s: backend exited on its own", self.name)
                await self.backend.stop()
            else:
                await self.backend.sleep()
        except Exception as exc:
            log.warning("service %s: sleep failed (%s); stopping it", self.name, exc)
            await self._stop_backend()
        self.backend.prepare_next_wake()
        if reason == "exited" or mode == "stop" or not self.backend.keeps_connections:
            for pool in self.pools:
                pool.close_idle()
        self.sleeps += 1
        self._count(self.sleep_reasons, reason)
        if quick_exit and self.failures_in_a_row:
            # It exited again soon after an earlier failure: a crash loop. Back off before the next
            # start instead of restarting at once (Kubernetes' CrashLoopBackOff).
            log.warning("service %s: exited %d times in a row within %.0fs of starting; backing off",
                        self.name, self.failures_in_a_row + 1, STABLE_SECONDS)
            self._fail(503, "service keeps exiting")
            return
        if quick_exit:
            self.failures_in_a_row += 1  # the first quick exit restarts at once; the next one backs off
        elif reason != "exited":
            self.failures_in_a_row = 0
        self._set("slept")
        # Requests that arrived while SLEEPING are in the queue: the loop wakes at once.

    @staticmethod
    def _count(counts: dict, key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    async def close(self, stop_backend: bool = True, reason: str = "wakegate is shutting down") -> None:
        """Stop the supervisor and the backend (wakegate is exiting); without stop_backend, only let
        go of it (the service went away: there is nothing left to stop)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.gate is not None:
            self.gate.close(reason)
        self._answer(Refused(503, reason, 1.0))
        if self.backend is None:
            return
        if not stop_backend:
            await self.backend.close()
            return
        if self.state is READY and not self.backend.exited().done():
            try:
                await asyncio.wait_for(self.backend.sleep(), CLOSE_SLEEP_TIMEOUT)
            except Exception as exc:  # the stop below ends it anyway
                log.warning("service %s: sleep at shutdown failed: %s", self.name, exc or type(exc).__name__)
        await self.backend.stop()
        await self.backend.close()
