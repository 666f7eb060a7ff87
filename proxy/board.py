"""The board: every service's published state and every worker's counts for it, in memory that the
controller and all proxy workers share, so a worker admits a request to a READY service without
asking anyone. ``Board`` is the C type (proxy/_speedups.c); ``PyBoard`` is its pure-Python twin.

Layout: 64-bit words in 64-byte lines. A header line, then per service slot one line of its own
(state, failed_until in monotonic ns, held requests across all workers) and one line per worker
(in_flight, tunnels, held, the monotonic ns of its last release). Each worker writes only its own
lines; the controller alone writes the state. A line per writer keeps workers off each other's
cache lines.

The ordering protocol (the reason this is race-free):
- A worker admits with ``admit``: add 1 to its in_flight, then read the state. READY: admitted.
  Anything else: take the 1 back and hold the request (``hold``), then ask the controller to wake.
- The controller puts a service to sleep by publishing SLEEPING first, then waiting until the
  in_flight of every worker is 0, and only then freezing, stopping or snapshotting it.
Both sides store, then load, with sequentially consistent atomics (Dekker's pattern), so they
cannot both miss each other: either the controller's wait sees the worker's 1, or the worker
sees SLEEPING and holds. A request that was admitted therefore always finishes before the sleep
starts, and one that finds the service going to sleep is held and makes it wake again.
``leave`` stores the release time before dropping the count, so the controller never finds a
service idle with a stale last-activity time.

The twin does each operation under a POSIX record lock on the shared memory's descriptor when
it is shared between processes (the lock's system calls order memory as the atomics do); alone
in one process it needs no lock.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import time

# Published states (controller.service.State maps onto these)
ASLEEP, WAKING, READY, SLEEPING, FAILED = range(5)
STATE_NAMES = ("asleep", "waking", "ready", "sleeping", "failed")  # by code, as controller.service.State names them

WORDS = 8  # per line: 64 bytes, one cache line
B_STATE, B_FAILED_UNTIL, B_HELD_TOTAL = 0, 1, 2
C_IN_FLIGHT, C_TUNNELS, C_LAST_NS, C_HELD = 0, 1, 2, 3


def board_bytes(slots: int, workers: int) -> int:
    return 8 * WORDS * (1 + slots * (1 + workers))


class PyBoard:
    """The pure-Python twin of proxy._speedups.Board: the same methods, results and errors."""

    def __init__(self, buffer, slots: int, workers: int, lock_fd: int = -1) -> None:
        if slots < 1 or workers < 1:
            raise ValueError("a board needs at least one slot and one worker")
        view = memoryview(buffer)
        if view.nbytes < board_bytes(slots, workers):
            raise ValueError(f"board buffer: {view.nbytes} bytes (needs {board_bytes(slots, workers)}, 64-byte aligned)")
        self._w = view.cast("B").cast("q")
        self.slots = slots
        self.workers = workers
        self._lock_fd = lock_fd

    @staticmethod
    def size(slots: int, workers: int) -> int:
        return board_bytes(slots, workers)

    def _slot(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise IndexError(f"board slot {slot} out of range (0..{self.slots - 1})")
        return WORDS + slot * WORDS * (1 + self.workers)

    def _column(self, slot: int, worker: int) -> int:
        base = self._slot(slot)
        if not 0 <= worker < self.workers:
            raise IndexError(f"board worker {worker} out of range (0..{self.workers - 1})")
        return base + WORDS * (1 + worker)

    def _lock(self) -> None:
        if self._lock_fd >= 0:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)

    def admit(self, slot: int, worker: int) -> bool:
        s, c = self._slot(slot), self._column(slot, worker)
        w = self._w
        self._lock()
        try:
            if w[s + B_STATE] == READY:
                w[c + C_IN_FLIGHT] += 1
                return True
            return False
        finally:
            self._unlock()

    def leave(self, slot: int, worker: int, tunnel: int) -> None:
        c = self._column(slot, worker)
        w = self._w
        self._lock()
        w[c + C_LAST_NS] = time.monotonic_ns()
        if tunnel:
            w[c + C_TUNNELS] -= 1
        w[c + C_IN_FLIGHT] -= 1
        self._unlock()

    def open_tunnel(self, slot: int, worker: int) -> None:
        c = self._column(slot, worker)
        self._lock()
        self._w[c + C_TUNNELS] += 1
        self._unlock()

    def hold(self, slot: int, worker: int, max_queue: int) -> bool:
        s, c = self._slot(slot), self._column(slot, worker)
        w = self._w
        self._lock()
        try:
            if w[s + B_HELD_TOTAL] + 1 > max_queue:
                return False
            w[s + B_HELD_TOTAL] += 1
            w[c + C_HELD] += 1
            return True
        finally:
            self._unlock()

    def unhold(self, slot: int, worker: int) -> None:
        s, c = self._slot(slot), self._column(slot, worker)
        w = self._w
        self._lock()
        w[c + C_HELD] -= 1
        w[s + B_HELD_TOTAL] -= 1
        self._unlock()

    def publish(self, slot: int, state: int, failed_until_ns: int) -> None:
        s = self._slot(slot)
        self._lock()
        self._w[s + B_FAILED_UNTIL] = failed_until_ns
        self._w[s + B_STATE] = state
        self._unlock()

    def state(self, slot: int) -> int:
        return self._w[self._slot(slot) + B_STATE]

    def failed_until(self, slot: int) -> int:
        return self._w[self._slot(slot) + B_FAILED_UNTIL]

    def column(self, slot: int, worker: int) -> tuple[int, int, int, int]:
        c = self._column(slot, worker)
        w = self._w
        return (w[c + C_IN_FLIGHT], w[c + C_TUNNELS], w[c + C_HELD], w[c + C_LAST_NS])

    def totals(self, slot: int) -> tuple[int, int, int, int]:
        s = self._slot(slot)
        w = self._w
        in_flight = tunnels = last = 0
        self._lock()
        for worker in range(self.workers):
            c = s + WORDS * (1 + worker)
            in_flight += w[c + C_IN_FLIGHT]
            tunnels += w[c + C_TUNNELS]
            last = max(last, w[c + C_LAST_NS])
        held = w[s + B_HELD_TOTAL]
        self._unlock()
        return (in_flight, tunnels, held, last)

    def reclaim(self, worker: int) -> None:
        w = self._w
        self._lock()
        try:
            for slot in range(self.slots):
                s, c = self._slot(slot), self._column(slot, worker)
                w[s + B_HELD_TOTAL] -= w[c + C_HELD]
                w[c + C_HELD] = w[c + C_TUNNELS] = w[c + C_IN_FLIGHT] = 0
        finally:
            self._unlock()

    def clear(self, slot: int) -> None:
        s = self._slot(slot)
        self._lock()
        for k in range(WORDS * (1 + self.workers)):
            self._w[s + k] = 0
        self._unlock()


if os.environ.get("WAKEGATE_PUREPYTHON", "") not in ("", "0"):
    Board = PyBoard
else:
    try:
        from ._speedups import Board
    except ImportError:
        Board = PyBoard


class SharedBoard:
    """A board in a memfd: ``fd`` is passed to the workers, which map it with ``attach``."""

    def __init__(self, slots: int, workers: int, board_type=None) -> None:
        self.slots, self.workers = slots, workers
        self.fd = os.memfd_create("wakegate-board", 0)  # no MFD_CLOEXEC: passed on explicitly (pass_fds)
        os.ftruncate(self.fd, board_bytes(slots, workers))
        self.map = mmap.mmap(self.fd, board_bytes(slots, workers))
        self.board = (board_type or Board)(self.map, slots, workers, self.fd)

    def close(self) -> None:
        self.board = None
        try:
            self.map.close()
        except BufferError:  # a board still holds a view; the mapping goes with the process
            pass
        os.close(self.fd)


def attach(fd: int, slots: int, workers: int, board_type=None):
    """A worker's view of the controller's board."""
    mapping = mmap.mmap(fd, board_bytes(slots, workers))
    return (board_type or Board)(mapping, slots, workers, fd), mapping


def local_board(slots: int, workers: int = 1, board_type=None):
    """A board for one process (no sharing, no lock): the single-process front door and tests."""
    mapping = mmap.mmap(-1, board_bytes(slots, workers))
    return (board_type or Board)(mapping, slots, workers)
