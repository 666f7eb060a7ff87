"""Host and path-prefix routing: from a request's host and path to its service.

Exact hosts cost one dict lookup; ``*.suffix`` wildcards match any deeper name;
path prefixes match on segment boundaries and the longest one wins.
"""

from __future__ import annotations

from typing import Generic, Iterable, TypeVar

T = TypeVar("T")

_BOUNDARY = frozenset(b"/?#")


def prefix_matches(prefix: bytes, path: bytes) -> bool:
    """"/api" matches "/api", "/api/x" and "/api?q", but not "/apix"."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith(b"/") or path[len(prefix)] in _BOUNDARY


class _Paths(Generic[T]):
    """The services of one host, by path prefix, longest first."""

    __slots__ = ("prefixes", "fallback")

    def __init__(self) -> None:
        self.prefixes: list[tuple[bytes, T]] = []
        self.fallback: T | None = None

    def add(self, prefix: bytes, target: T) -> None:
        if not prefix:
            self.fallback = target
        else:
            self.prefixes.append((prefix, target))
            self.prefixes.sort(key=lambda item: -len(item[0]))

    def match(self, path: bytes) -> T | None:
        for prefix, target in self.prefixes:
            if prefix_matches(prefix, path):
                return target
        return self.fallback


class Router(Generic[T]):
    """Maps (host, path) to a target; hosts are lower-case bytes without port."""

    def __init__(self, default: T | None = None) -> None:
        # exact host -> target, or -> _Paths when the host has path prefixes
        self.exact: dict[bytes, object] = {}
        self._wildcard: dict[bytes, object] = {}
        self.default = default

    def add(self, hosts: Iterable[str], paths: Iterable[str], target: T) -> None:
        paths = [p.encode() for p in paths]
        for host in hosts:
            host = host.lower().encode()
            table = self.exact
            if host.startswith(b"*."):
                table, host = self._wildcard, host[2:]
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
        for table in (self.exact, self._wildcard):
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

    def route(self, host: bytes | None, path: bytes) -> T | None:
        """The target for this request, the default, or None."""
        if host is not None:
            entry = self.exact.get(host)
            if entry is not None:
                found = entry.match(path) if type(entry) is _Paths else entry
                if found is not None:
                    return found
            if self._wildcard and host:
                dot = host.find(b".")
                while dot >= 0:
                    entry = self._wildcard.get(host[dot + 1 :])
                    if entry is not None:
                        found = entry.match(path) if type(entry) is _Paths else entry
                        if found is not None:
                            return found
                    dot = host.find(b".", dot + 1)
        return self.default


class PortRouter(Generic[T]):
    """A listener of its own for one service, or for replicas that share a port (pods of one app on
    one Kubernetes node): every request on it goes to one member, whatever its Host.

    With several members, an awake one is taken in turn; when none is awake, the first one, so
    that a burst wakes one replica rather than every one of them. ``members`` is changed in place
    by a reload, so connections already open on the listener see the new members.
    """

    exact: dict = {}  # no Host lookups: ClientConnection's fast path always misses

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
