"""proxy.routing: exact and wildcard hosts, longest path prefix on segment boundaries."""

import pytest

from proxy.routing import PortRouter, Router, prefix_matches


@pytest.fixture
def router():
    r = Router(default=None)
    r.add(["a.example"], [], "a")
    r.add(["a.example"], ["/api", "/api/v2"], "a-api")
    r.add(["a.example"], ["/static/"], "a-static")
    r.add(["*.b.example"], [], "b-any")
    r.add(["x.b.example"], [], "b-x")
    r.add(["*.c.example"], ["/only"], "c-only")
    r.add(["[::1]"], [], "v6")
    return r


ROUTES = [
    # host, path, target
    (b"a.example", b"/", "a"),
    (b"a.example", b"/api", "a-api"),
    (b"a.example", b"/api/users", "a-api"),
    (b"a.example", b"/api?x=1", "a-api"),
    (b"a.example", b"/apix", "a"),
    (b"a.example", b"/api/v2/x", "a-api"),
    (b"a.example", b"/static/app.js", "a-static"),
    (b"a.example", b"/static", "a"),
    (b"y.b.example", b"/", "b-any"),
    (b"z.y.b.example", b"/", "b-any"),
    (b"x.b.example", b"/", "b-x"),
    (b"b.example", b"/", None),
    (b"q.c.example", b"/only/x", "c-only"),
    (b"q.c.example", b"/other", None),
    (b"[::1]", b"/", "v6"),
    (b"unknown", b"/", None),
    (None, b"/", None),
    (b"", b"/", None),
]


@pytest.mark.parametrize("host,path,target", ROUTES)
def test_route(router, host, path, target):
    assert router.route(host, path) == target


REMOVALS = [
    # removed target, (host, path) that must no longer reach it, what they reach instead
    ("a-api", (b"a.example", b"/api/users"), "a"),
    ("a", (b"a.example", b"/"), None),
    ("b-x", (b"x.b.example", b"/"), "b-any"),
    ("b-any", (b"y.b.example", b"/"), None),
    ("c-only", (b"q.c.example", b"/only/x"), None),
]


@pytest.mark.parametrize("removed,request_,now", REMOVALS)
def test_remove_forgets_a_target_and_leaves_the_others(router, removed, request_, now):
    before = {(h, p): router.route(h, p) for h, p, _ in ROUTES}
    router.remove(removed)
    assert router.route(*request_) == now
    for (h, p), target in before.items():
        if target != removed:
            assert router.route(h, p) == target, (h, p)


def test_default(router):
    router.default = "fallback"
    assert router.route(b"unknown", b"/") == "fallback"
    assert router.route(None, b"/") == "fallback"
    assert router.route(b"a.example", b"/") == "a"


def test_longest_prefix_wins_in_any_order():
    r = Router()
    r.add(["h"], ["/a/b/c"], "deep")
    r.add(["h"], ["/a"], "shallow")
    r.add(["h"], ["/a/b"], "middle")
    assert [r.route(b"h", p) for p in (b"/a/b/c/d", b"/a/b/x", b"/a/x", b"/x")] == ["deep", "middle", "shallow", None]


@pytest.mark.parametrize(
    "prefix,path,ok",
    [(b"/api", b"/api", True), (b"/api", b"/api/", True), (b"/api", b"/api#f", True), (b"/api", b"/apiary", False),
     (b"/api/", b"/api/x", True), (b"/api/", b"/api", False), (b"/", b"/anything", True)],
)
def test_prefix_matches(prefix, path, ok):
    assert prefix_matches(prefix, path) == ok


class _Member:
    """A route as PortRouter sees it: its gate says whether the service is awake."""

    def __init__(self, name: str, awake: bool | None) -> None:
        self.name = name
        self.service = None if awake is None else type("Gate", (), {"awake": awake})()

    def __repr__(self) -> str:
        return self.name


PORT_ROUTES = [
    # members (name, awake: True, False, or None for always up), picks in a row
    ([], [None, None]),
    ([("a", False)], ["a", "a"]),
    ([("a", True), ("b", True)], ["a", "b", "a", "b"]),
    ([("a", False), ("b", True)], ["b", "b", "b"]),  # the awake replica; the sleeper stays asleep
    ([("a", False), ("b", False)], ["a", "a", "a"]),  # none awake: one wake, of the first
    ([("a", True), ("b", False), ("c", True)], ["a", "c", "a", "c"]),
    ([("a", None), ("b", False)], ["a", "a"]),
]


@pytest.mark.parametrize("members,picks", PORT_ROUTES)
def test_a_port_router_takes_awake_members_in_turn(members, picks):
    router = PortRouter([_Member(name, awake) for name, awake in members])
    got = [router.route(b"any.host", b"/") for _ in picks]
    assert [m.name if m is not None else None for m in got] == picks
    assert router.exact == {}  # every request misses the Host fast path and asks route()


def test_a_port_router_sees_members_changed_in_place():
    router = PortRouter([_Member("a", True)])
    members = router.members
    members[:] = [_Member("b", True)]
    assert router.route(None, b"/").name == "b"
    members.clear()
    assert router.route(None, b"/") is None
