"""A proxy process's side of the seam for one service: ``acquire()`` admits a request to a READY
service through the shared board (no message, no suspension), or holds it and asks the controller,
once, to wake the service; the controller's ``answer()`` then releases or refuses what it holds.

Held requests of one process are released in their arrival order. A request held longer than the
service's wake_timeout is refused with 504 by ``expire()``, which the process's ticker calls. A
release that finds the service asleep again (it went to sleep before the answer came) keeps the
rest held and asks again: the board, not the answer, decides admission (see proxy/board.py).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable

from .board import FAILED, READY
from .seam import Refused
from .warm import warm_lease

# Lease states
L_HELD, L_GRANTED, L_REFUSED, L_RELEASED, L_CANCELLED = range(5)


class Lease:
    """One request's claim on a service: granted at once when READY, else held by its gate.

    ``granted`` is true when the request may go upstream now. A held lease calls
    ``on_ready(lease)`` later, once granted or refused (see ``refused``).
    ``await lease`` works too. ``release()`` must be called exactly once, after
    the response (or after a refusal, where it does nothing).
    """

    __slots__ = ("gate", "status", "refused", "on_ready", "held_at", "tunnel")

    def __init__(self, gate: "Gate", status: int) -> None:
        self.gate = gate
        self.status = status
        self.refused: Refused | None = None
        self.on_ready: Callable[["Lease"], None] | None = None
        self.held_at = 0.0
        self.tunnel = False

    @property
    def granted(self) -> bool:
        return self.status == L_GRANTED

    @property
    def held(self) -> bool:
        return self.status == L_HELD

    def _grant(self) -> None:
        self.status = L_GRANTED
        if self.on_ready is not None:
            self.on_ready(self)

    def _refuse(self, refused: Refused) -> None:
        self.status = L_REFUSED
        self.refused = refused
        if self.on_ready is not None:
            self.on_ready(self)

    def release(self) -> None:
        """The request is over. Held leases are withdrawn from the queue."""
        status = self.status
        gate = self.gate
        if status == L_GRANTED:
            self.status = L_RELEASED
            gate.board.leave(gate.slot, gate.worker, self.tunnel)
        elif status == L_HELD:
            self.status = L_CANCELLED  # the queue skips it when releasing
            gate.held -= 1
            gate.board.unhold(gate.slot, gate.worker)

    def open_tunnel(self) -> None:
        """The request became an Upgrade tunnel: it keeps the service awake until released."""
        if self.status == L_GRANTED and not self.tunnel:
            self.tunnel = True
            self.gate.board.open_tunnel(self.gate.slot, self.gate.worker)

    def __await__(self):
        if self.status == L_HELD:
            future = asyncio.get_running_loop().create_future()
            self.on_ready = lambda lease: future.done() or future.set_result(None)
            yield from future.__await__()
        if self.status == L_REFUSED:
            raise self.refused
        return self


class Gate:
    """One service as one proxy process sees it: its board slot, its held requests, its wake ask."""

    def __init__(self, name: str, board, slot: int, worker: int, *, max_queue: int, wake_timeout: float,
                 ask: Callable[["Gate"], None]) -> None:
        self.name = name
        self.board = board
        self.slot = slot
        self.worker = worker
        self.max_queue = max_queue
        self.wake_timeout = wake_timeout
        self.ask = ask  # tells the controller this process holds requests for the service
        self.queue: collections.deque[Lease] = collections.deque()
        self.held = 0  # live leases in the queue (cancelled ones are skipped)
        self.asked = False  # an ask is out and no answer has come yet
        self.closing: str | None = None  # no new holds: the reason given to them
        self.holding: set | None = None  # the process's set of gates with held requests (for expire)
        # The lease of every request admitted at once: one object, not one per request (proxy/warm.py).
        self.warm_lease = warm_lease(board, slot, worker)

    @property
    def awake(self) -> bool:
        """A request now would be served without a wake."""
        return self.board.state(self.slot) == READY

    def acquire(self) -> Lease:
        """A granted lease when READY (no suspension), else a held one, or raise Refused."""
        if self.board.admit(self.slot, self.worker):
            return Lease(self, L_GRANTED)
        if self.closing is not None:
            raise Refused(503, self.closing, 1.0)
        if self.board.state(self.slot) == FAILED:
            left = self.board.failed_until(self.slot) / 1e9 - time.monotonic()
            if left > 0:
                raise Refused(503, "service failed to wake", left)
        if not self.board.hold(self.slot, self.worker, self.max_queue):
            raise Refused(503, "wake queue full", 1.0)
        lease = Lease(self, L_HELD)
        lease.held_at = time.monotonic()
        self.queue.append(lease)
        self.held += 1
        if self.holding is not None:
            self.holding.add(self)  # so the expiry tick looks at this gate, and only such gates
        if not self.asked:
            self.asked = True
            self.ask(self)
        return lease

    def answer(self, refused: Refused | None) -> None:
        """The controller's word on the wake: None (READY: release in arrival order) or a refusal."""
        self.asked = False
        queue = self.queue
        if refused is not None:
            self._refuse_all(refused)
            return
        while queue:
            lease = queue[0]
            if lease.status != L_HELD:
                queue.popleft()
                continue
            if not self.board.admit(self.slot, self.worker):
                # Asleep again before this answer came: the rest stays held, and asks again.
                self.asked = True
                self.ask(self)
                return
            queue.popleft()
            self.held -= 1
            self.board.unhold(self.slot, self.worker)
            lease._grant()

    def _refuse_all(self, refused: Refused) -> None:
        queue = self.queue
        while queue:
            lease = queue.popleft()
            if lease.status == L_HELD:
                self.held -= 1
                self.board.unhold(self.slot, self.worker)
                lease._refuse(refused)

    def expire(self, now: float) -> None:
        """Refuse held leases older than wake_timeout (called by the process's ticker)."""
        queue = self.queue
        limit = now - self.wake_timeout
        while queue and (queue[0].status != L_HELD or queue[0].held_at <= limit):
            lease = queue.popleft()
            if lease.status == L_HELD:
                self.held -= 1
                self.board.unhold(self.slot, self.worker)
                lease._refuse(Refused(504, "wake timed out", 1.0))

    def close(self, reason: str) -> None:
        """No more holds; the held ones are refused with reason."""
        self.closing = reason
        self._refuse_all(Refused(503, reason, 1.0))
