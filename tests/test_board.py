"""proxy.board: the shared table of service states and worker counts, on both implementations,
and its ordering protocol under real concurrency (processes hammering admit while a controller
puts the service to sleep)."""

import multiprocessing
import os
import time

import pytest

from proxy import board as boards
from proxy.board import ASLEEP, FAILED, READY, SLEEPING, PyBoard, SharedBoard, attach, local_board

IMPLEMENTATIONS = [PyBoard]
if not os.environ.get("WAKEGATE_PUREPYTHON"):
    from proxy._speedups import Board as CBoard

    IMPLEMENTATIONS.insert(0, CBoard)


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda t: "c" if t is not PyBoard else "native")
def kind(request):
    return request.param


def test_size_matches_the_layout(kind):
    assert kind.size(3, 2) == boards.board_bytes(3, 2) == 8 * 8 * (1 + 3 * 3)


# (step, arguments, expected result); one board of 2 slots and 2 workers, run in order
SCRIPT = [
    ("state", (0,), ASLEEP),
    ("admit", (0, 0), False),  # asleep: not admitted, and nothing left counted
    ("totals", (0,), (0, 0, 0, 0)),
    ("hold", (0, 0, 2), True),
    ("hold", (0, 1, 2), True),
    ("hold", (0, 1, 2), False),  # max_queue counts every worker's holds
    ("totals", (0,), (0, 0, 2, 0)),
    ("column", (0, 1), (0, 0, 1, 0)),
    ("publish", (0, READY, 0), None),
    ("unhold", (0, 0), None),
    ("admit", (0, 0), True),
    ("admit", (0, 1), True),
    ("admit", (1, 1), False),  # the other slot is untouched
    ("open_tunnel", (0, 1), None),
    ("totals", (0,), (2, 1, 1, 0)),
    ("publish", (0, SLEEPING, 0), None),
    ("admit", (0, 0), False),
    ("column", (0, 0), (1, 0, 0, 0)),
    ("reclaim", (1,), None),  # worker 1 died: its requests, tunnel and hold are gone
    ("totals", (0,), (1, 0, 0, 0)),
    ("publish", (0, FAILED, 123), None),
    ("failed_until", (0,), 123),
    ("state", (0,), FAILED),
    ("clear", (0,), None),
    ("totals", (0,), (0, 0, 0, 0)),
    ("state", (0,), ASLEEP),
]


def test_script(kind):
    board = local_board(2, 2, kind)
    for step, args, expected in SCRIPT:
        assert getattr(board, step)(*args) == expected, (step, args)


def test_leave_records_the_time_before_the_count_drops(kind):
    board = local_board(1, 1, kind)
    board.publish(0, READY, 0)
    before = time.monotonic_ns()
    assert board.admit(0, 0)
    board.leave(0, 0, False)
    in_flight, _, _, last = board.totals(0)
    assert in_flight == 0 and before <= last <= time.monotonic_ns()


@pytest.mark.parametrize("call, args, error", [
    ("admit", (2, 0), IndexError),
    ("admit", (0, 2), IndexError),
    ("admit", (-1, 0), IndexError),
    ("state", (5,), IndexError),
    ("totals", (2,), IndexError),
    ("reclaim", (2,), IndexError),
])
def test_out_of_range_is_a_clear_error(kind, call, args, error):
    board = local_board(2, 2, kind)
    with pytest.raises(error, match="out of range"):
        getattr(board, call)(*args)


def test_too_small_a_buffer_is_refused(kind):
    with pytest.raises(ValueError, match="needs"):
        kind(bytearray(64), 1, 1)
    with pytest.raises(ValueError):
        kind(bytearray(4096), 0, 1)


def test_both_implementations_read_each_others_board():
    if len(IMPLEMENTATIONS) < 2:
        pytest.skip("the C extension is not in use")
    shared = SharedBoard(2, 2, IMPLEMENTATIONS[0])
    try:
        other, mapping = attach(shared.fd, 2, 2, PyBoard)
        shared.board.publish(1, READY, 7)
        assert other.admit(1, 1) and other.state(1) == READY
        assert shared.board.totals(1)[0] == 1
        other.leave(1, 1, False)
        assert shared.board.totals(1)[0] == 0
        del other
        mapping.close()
    finally:
        shared.close()


# ---- the protocol under real concurrency --------------------------------------------------

def _hammer(fd, worker, kind_name, seconds, violations):
    kind = PyBoard if kind_name == "native" else CBoard
    board, mapping = attach(fd, 2, 3, kind)
    bad = admitted = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if board.admit(0, worker):
            admitted += 1
            if board.state(1) == READY:  # slot 1's state is the test's "frozen" flag
                bad += 1
            board.leave(0, worker, False)
    violations.put((bad, admitted))
    del board
    mapping.close()


def test_no_request_is_admitted_into_a_frozen_service(kind):
    """Two worker processes admit and release as fast as they can while the controller cycles the
    service: publish SLEEPING, wait for in_flight 0, set 'frozen', then clear it and publish READY.
    A worker that is admitted must never see 'frozen'."""
    name = "c" if kind is not PyBoard else "native"
    shared = SharedBoard(2, 3, kind)
    board = shared.board
    board.publish(0, READY, 0)
    ctx = multiprocessing.get_context("fork")
    violations = ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(shared.fd, w, name, 1.5, violations)) for w in (0, 1)]
    for p in workers:
        p.start()
    cycles = 0
    deadline = time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline:
            board.publish(0, SLEEPING, 0)
            while board.totals(0)[0]:
                pass
            board.publish(1, READY, 0)  # frozen
            board.publish(1, ASLEEP, 0)  # thawed
            board.publish(0, READY, 0)
            cycles += 1
        board.publish(0, READY, 0)
        results = [violations.get(timeout=30) for _ in workers]
    finally:
        for p in workers:
            p.join(30)
        shared.close()
    assert all(p.exitcode == 0 for p in workers)
    assert cycles > 10 and sum(a for _, a in results) > 100
    assert sum(b for b, _ in results) == 0, results
