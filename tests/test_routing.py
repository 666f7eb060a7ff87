"""proxy.routing: exact and wildcard hosts, longest path prefix on segment boundaries."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import _native
from proxy.routing import PortRouter, Router, prefix_matches
from proxy.warm import PathsBase

from .conftest import PURE


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


def test_route_refuses_what_is_not_bytes(router):
    for host, path in ((b"a.example", "/"), ("a.example", b"/"), (b"a.example", None)):
        with pytest.raises(TypeError, match="route"):
            router.route(host, path)


def _twin_of(router):
    """The same tables in the pure-Python twin's types."""
    twin = _native.RouterBase()
    for table, twin_table in ((router.exact, twin.exact), (router.wildcard, twin.wildcard)):
        for host, entry in table.items():
            if isinstance(entry, PathsBase):
                paths = _native.PathsBase()
                paths.prefixes, paths.fallback = list(entry.prefixes), entry.fallback
                entry = paths
            twin_table[host] = entry
    twin.default = router.default
    return twin


HOST_PARTS = st.sampled_from([b"a", b"b", b"c", b"x", b"y", b"example", b"[::1]", b""])
PATH_PARTS = st.sampled_from([b"/", b"api", b"/api", b"v2", b"static", b"only", b"x", b"?", b"#", b"="])


@pytest.mark.skipif(PURE, reason="compares the C table with the twin")
@settings(max_examples=500, deadline=None)
@given(host=st.one_of(st.none(), st.lists(HOST_PARTS, max_size=4).map(b".".join)),
       path=st.lists(PATH_PARTS, max_size=6).map(b"".join), default=st.booleans())
def test_the_c_table_routes_as_its_twin(host, path, default):
    r = Router(default="fallback" if default else None)
    r.add(["a.example"], [], "a")
    r.add(["a.example"], ["/api", "/api/v2", "/static/"], "a-paths")
    r.add(["*.b.example", "*.example"], [], "wild")
    r.add(["x.b.example"], [], "b-x")
    r.add(["*.c.example"], ["/only"], "c-only")
    r.add(["[::1]"], [], "v6")
    assert r.route(host, path) == _twin_of(r).route(host, path)


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


def test_a_port_router_sees_members_changed_in_place():
    router = PortRouter([_Member("a", True)])
    members = router.members
    members[:] = [_Member("b", True)]
    assert router.route(None, b"/").name == "b"
    members.clear()
    assert router.route(None, b"/") is None
