"""Host and path-prefix routing: from a request's host and path to its service.

Exact hosts cost one dict lookup; ``*.suffix`` wildcards match any deeper name;
path prefixes match on segment boundaries and the longest one wins. The tables and the lookup
are RouterBase's and PathsBase's (proxy/_warm.c, twins in proxy/_native.py); this module fills them.
"""

from __future__ import annotations

from typing import Generic, Iterable, TypeVar

from ._native import prefix_matches  # noqa: F401  (the rule route() applies, in C or in the twin)
from .warm import PathsBase, RouterBase

T = TypeVar("T")


class _Paths(PathsBase):
    """The services of one host, by path prefix, longest first (match() is PathsBase's)."""

    __slots__ = ()

    def add(self, prefix: bytes, target) -> None:
        if not prefix:
            self.fallback = target
        else:
            self.prefixes.append((prefix, target))
            self.prefixes.sort(key=lambda item: -len(item[0]))


class Router(RouterBase, Generic[T]):
    """Maps (host, path) to a target; hosts are lower-case bytes without port. The tables are
    RouterBase's (C, or its twin), and so is route(), which the warm path calls without Python."""

    __slots__ = ()

    def __init__(self, default: T | None = None) -> None:
        super().__init__()
        # exact host -> target, or -> _Paths when the host has path prefixes; wildcard likewise
        self.default = default

    def add(self, hosts: Iterable[str], paths: Iterable[str], target: T) -> None:
        paths = [p.encode() for p in paths]
        for host in hosts:
            host = host.lower().encode()
            table = self.exact
            if host.startswith(b"*."):
                table, host = self.wildcard, host[2:]
            entry = table.get(host)
            if not paths and entry is None:
                table[host] = target  # the common case: one service, no paths
                continue
            if not isinstance(entry, _Paths):
                first = entry
                entry = table[host] = _Paths()
                if first is not None:
                    entry.add(b"", first)
            for prefix in paths or [b""]:
                entry.add(prefix, target)

    def remove(self, target: T) -> None:
        """Forget every host and path that leads to target (a service that went away)."""
        for table in (self.exact, self.wildcard):
            for host, entry in list(table.items()):
                if entry is target:
                    del table[host]
                elif type(entry) is _Paths:
                    entry.prefixes = [(p, t) for p, t in entry.prefixes if t is not target]
                    if entry.fallback is target:
                        entry.fallback = None
                    if not entry.prefixes and entry.fallback is None:
                        del table[host]
        if self.default is target:
            self.default = None


class PortRouter(Generic[T]):
    """A listener of its own for one service, or for replicas that share a port (pods of one app on
    one Kubernetes node): every request on it goes to one member, whatever its Host.

    With several members, an awake one is taken in turn; when none is awake, the first one, so
    that a burst wakes one replica rather than every one of them. ``members`` is changed in place
    by a reload, so connections already open on the listener see the new members.
    """

    def __init__(self, members: Iterable[T] = ()) -> None:
        self.members: list[T] = list(members)
        self._turn = 0

    def route(self, host: bytes | None, path: bytes) -> T | None:
        members = self.members
        if len(members) == 1:
            return members[0]
        if not members:
            return None
        count = len(members)
        for i in range(count):
            index = (self._turn + i) % count
            member = members[index]
            service = member.service  # a ServiceRoute's gate; None: always up
            if service is None or service.awake:
                self._turn = (index + 1) % count
                return member
        return members[0]
