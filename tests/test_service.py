"""controller.service in process: the life-cycle table and the supervisor, driven through a
scripted backend (a named fake of the Backend protocol), table by table, on both event loops.

Every test runs in a fresh loop and fails if it leaves a task or a timer behind.
"""

import asyncio
import time

import pytest
import uvloop

from controller.service import (
    ASLEEP, FAILED, READY, SERVICE_TRANSITIONS, IllegalTransition, Service, State,
)
from proxy.seam import Refused


class FakeBackend:
    """A fake backend (the Backend protocol with nothing behind it): each call takes the next
    scripted action for its method, and every call is logged with its start and end time."""

    keeps_connections = True

    def __init__(self, mode="stop", **script) -> None:
        self.mode = mode
        self.script = {name: list(actions) for name, actions in script.items()}
        self.log: list[tuple[str, str, float]] = []
        self.last_resume_seconds = 0.001
        self.last_ready_seconds = 0.001
        self.up = False
        self._exited = None
        self.stop_seconds = 0.0

    def _next(self, name):
        actions = self.script.get(name)
        return actions.pop(0) if actions else ("ok", 0.0)

    async def _act(self, name):
        action = self._next(name)
        self.log.append((name, "start", time.monotonic()))
        try:
            kind = action[0]
            if kind == "ok":
                await asyncio.sleep(action[1])
            elif kind == "raise":
                raise action[1]
            elif kind == "hang":
                await asyncio.sleep(3600)
        finally:
            self.log.append((name, "end", time.monotonic()))

    def exited(self):
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            if not self.up:
                self._exited.set_result(None)
        return self._exited

    def crash(self):
        """The service exits on its own."""
        self.up = False
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(1)

    async def wake(self, deadline):
        await self._act("wake")
        self.up = True
        self._exited = asyncio.get_running_loop().create_future()

    async def sleep(self):
        await self._act("sleep")
        if self.mode == "stop":
            self.crash()

    async def stop(self):
        await self._act("stop")
        self.crash()

    def describe(self):
        return {"pid": None}

    def snapshot_stats(self):
        return None

    def prepare_next_wake(self):
        self.log.append(("prepare_next_wake", "start", time.monotonic()))

    async def close(self):
        pass

    def calls(self, name):
        return [(phase, t) for n, phase, t in self.log if n == name]


LOOPS = ["asyncio", "uvloop"]


def run(loop_kind, make):
    """Run make() -> coroutine in a fresh loop of that kind; no task or timer may outlive it."""
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(make())
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        assert not left, f"tasks left behind: {left}"
        if loop_kind == "asyncio":
            timers = [h for h in loop._scheduled if not h.cancelled()]
            assert not timers, f"timers left behind: {timers}"
        return result
    finally:
        loop.close()


async def outcome(lease, timeout=5.0):
    """'granted', or the refusal's status."""
    try:
        await asyncio.wait_for(lease, timeout)
        return "granted"
    except Refused as refused:
        return refused.status


def make_service(backend, **kw):
    kw.setdefault("idle_timeout", None)
    kw.setdefault("wake_timeout", 1.0)
    return Service("svc", backend, **kw)


# ---- the table --------------------------------------------------------------------


def test_table_names_every_state_and_only_states():
    assert set(SERVICE_TRANSITIONS) == set(State)
    for moves in SERVICE_TRANSITIONS.values():
        assert all(isinstance(new, State) for new in moves.values())
    # every state can be reached and left
    reached = {new for moves in SERVICE_TRANSITIONS.values() for new in moves.values()}
    assert reached == set(State)


ILLEGAL = [(ASLEEP, "ready"), (ASLEEP, "sleep"), (READY, "wake"), (FAILED, "ready"), (READY, "slept")]


@pytest.mark.parametrize("state,event", ILLEGAL)
def test_illegal_transition_raises_a_clear_error(state, event):
    service = make_service(FakeBackend())
    service.state = state
    with pytest.raises(IllegalTransition, match=f"event '{event}' in state {state.value}"):
        service._set(event)


# ---- wakes, table-driven -----------------------------------------------------------

WAKES = [
    # name, wake script, held request's outcome, state after, stop called
    ("ok", [("ok", 0.01)], "granted", READY, False),
    ("raises", [("raise", RuntimeError("boom"))], 503, FAILED, True),
    ("times out", [("hang",)], 504, FAILED, True),
    ("readiness deadline", [("raise", type("NotReady", (Exception,), {"timed_out": True})("late"))], 504, FAILED,
     True),
]


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("name,script,expected,after,stopped", WAKES, ids=[w[0] for w in WAKES])
def test_wake(loop_kind, name, script, expected, after, stopped):
    async def scenario():
        backend = FakeBackend(wake=script)
        service = make_service(backend, wake_timeout=0.2)
        lease = service.acquire()
        assert lease.held
        assert await outcome(lease) == expected
        await asyncio.sleep(0.05)
        assert service.state is after
        assert bool(backend.calls("stop")) == stopped
        if expected == "granted":
            lease.release()
        await service.close()

    run(loop_kind, scenario)


SHUTDOWNS = [
    # name, sleep script, backend calls in order
    ("sleeps first", [("ok", 0.01)], ["wake", "sleep", "stop"]),
    ("stops when the sleep fails", [("raise", RuntimeError("boom"))], ["wake", "sleep", "stop"]),
]


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("name,script,calls", SHUTDOWNS, ids=[s[0] for s in SHUTDOWNS])
def test_shutdown_puts_an_awake_service_to_sleep_then_stops_it(loop_kind, name, script, calls):
    """A stateful snapshot must survive a restart of wakegate: close() sleeps a READY service in its
    own mode before stopping it, and starts nothing for a next wake."""
    async def scenario():
        backend = FakeBackend(sleep=script)
        service = make_service(backend)
        lease = service.acquire()
        assert await outcome(lease) == "granted"
        lease.release()
        await service.close()
        assert [n for n, phase, _ in backend.log if phase == "start"] == calls

    run(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_every_sleep_is_followed_by_getting_ready_for_the_next_wake(loop_kind):
    async def scenario():
        backend = FakeBackend()
        service = make_service(backend, idle_timeout=0.05)
        for _ in range(2):
            lease = service.acquire()
            assert await outcome(lease) == "granted"
            lease.release()
            while service.state is not ASLEEP:
                await asyncio.sleep(0.01)
        await service.close()
        order = [n for n, phase, _ in backend.log if phase == "start"]
        assert order == ["wake", "sleep", "prepare_next_wake", "wake", "sleep", "prepare_next_wake", "stop"]

    run(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_failed_wake_backs_off_then_wakes_again(loop_kind):
    async def scenario():
        backend = FakeBackend(wake=[("raise", RuntimeError("boom"))])
        service = make_service(backend)
        assert await outcome(service.acquire()) == 503
        with pytest.raises(Refused) as refused:  # within the backoff: refused at once
            service.acquire()
        assert refused.value.status == 503 and 0 < refused.value.retry_after <= 1.0
        service.failed_until = time.monotonic()  # the backoff is over
        lease = service.acquire()
        assert await outcome(lease) == "granted"
        lease.release()
        await service.close()

    run(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_next_wake_waits_for_the_stop_of_a_timed_out_one(loop_kind):
    """Issue 10, defect 2: the stop after a timed-out wake ran untracked, and the next wake could
    adopt the process still being stopped."""
    async def scenario():
        backend = FakeBackend(wake=[("hang",)], stop=[("ok", 0.3)])
        service = make_service(backend, wake_timeout=0.1)
        assert await outcome(service.acquire()) == 504
        service.failed_until = time.monotonic()  # no backoff: a request comes at once
        lease = service.acquire()
        assert await outcome(lease) == "granted"
        (_, stop_ended), = [c for c in backend.calls("stop") if c[0] == "end"]
        second_wake_started = [t for phase, t in backend.calls("wake") if phase == "start"][1]
        assert second_wake_started >= stop_ended
        lease.release()
        await service.close()

    run(loop_kind, scenario)


# ---- crashes inside the supervisor (issue 10, defect 4) -------------------------------

class ExplodingBackend(FakeBackend):
    """A fake backend with a bug in one place the supervisor calls outside its own error handling."""

    def __init__(self, where, **script):
        super().__init__(**script)
        self.where = where

    @property
    def last_resume_seconds(self):
        if self.where == "after wake" and self.up:
            self.where = None
            raise ValueError("a bug after the wake")
        return 0.001

    @last_resume_seconds.setter
    def last_resume_seconds(self, value):
        pass

    def exited(self):
        if self.where == "while ready" and self.up:
            self.where = None
            raise KeyError("a bug while ready")
        return super().exited()


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("where,first", [("after wake", 503), ("while ready", "granted")])
def test_supervisor_crash_fails_that_step_and_leaves_the_service_usable(loop_kind, where, first, caplog):
    async def scenario():
        backend = ExplodingBackend(where)
        service = make_service(backend)
        lease = service.acquire()
        assert await outcome(lease) == first
        if first == "granted":
            lease.release()
        for _ in range(100):
            if service.state is FAILED:
                break
            await asyncio.sleep(0.01)
        assert service.state is FAILED  # not stuck in WAKING or READY with a dead supervisor
        assert backend.calls("stop")
        service.failed_until = time.monotonic()
        again = service.acquire()
        assert await outcome(again) == "granted"
        assert service.state is READY
        again.release()
        await service.close()

    run(loop_kind, scenario)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "supervisor failed" in tracebacks[0].getMessage()


# ---- exits, sleeps, and a wake during a stop ------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_exit_after_ready_restarts_once_then_backs_off(loop_kind):
    """Issue 10, defect 15: a process that crashed after readiness was restarted at once, every time."""
    async def scenario():
        backend = FakeBackend()
        service = make_service(backend)
        lease = service.acquire()
        assert await outcome(lease) == "granted"
        lease.release()
        backend.crash()  # first exit: asleep, the next request restarts it at once
        await asyncio.sleep(0.05)
        assert service.state is ASLEEP
        lease = service.acquire()
        assert await outcome(lease) == "granted"
        lease.release()
        backend.crash()  # again, soon after: a crash loop
        await asyncio.sleep(0.05)
        assert service.state is FAILED
        with pytest.raises(Refused) as refused:
            service.acquire()
        assert refused.value.status == 503 and refused.value.retry_after > 0
        assert len(backend.calls("wake")) == 4  # two wakes, start and end each: no third start
        await service.close()

    run(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_idle_sleep_waits_for_in_flight_then_wakes_for_a_request_held_meanwhile(loop_kind):
    async def scenario():
        backend = FakeBackend(sleep=[("ok", 0.2)])
        service = make_service(backend, idle_timeout=0.05)
        first = service.acquire()
        assert await outcome(first) == "granted"
        await asyncio.sleep(0.15)
        assert service.state is READY  # in flight: no sleep
        first.release()
        for _ in range(100):
            if backend.calls("sleep"):
                break
            await asyncio.sleep(0.01)
        held = service.acquire()  # arrives during the sleep
        assert held.held
        assert await outcome(held) == "granted"
        (_, slept), = [c for c in backend.calls("sleep") if c[0] == "end"]
        assert [t for phase, t in backend.calls("wake") if phase == "start"][1] >= slept
        held.release()
        await service.close()

    run(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_queue_full_and_shutdown_refuse(loop_kind):
    async def scenario():
        service = make_service(FakeBackend(wake=[("ok", 0.2)]), max_queue=2)
        leases = [service.acquire(), service.acquire()]
        with pytest.raises(Refused) as refused:
            service.acquire()
        assert refused.value.status == 503
        await service.close()
        assert [await outcome(lease) for lease in leases] == [503, 503]
        with pytest.raises(Refused):
            service.acquire()

    run(loop_kind, scenario)
