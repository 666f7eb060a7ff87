"""The warm path's types: the C extension's (a keep-alive request to an awake service handled in C,
proxy/_warm.c), or their pure-Python twins, with which every request takes the Python path.

``WAKEGATE_PUREPYTHON=1`` forces the twins, as it forces the parser's (proxy/http11.py).
"""

import importlib
import os

from . import _native


def _implementation():
    if os.environ.get("WAKEGATE_PUREPYTHON", "") not in ("", "0"):
        return _native
    try:
        return importlib.import_module("._speedups", __package__)
    except ImportError:
        return _native


_impl = _implementation()
ACCESS_FLUSH_BYTES = _impl.ACCESS_FLUSH_BYTES
AccessLogBase = _impl.AccessLogBase
BUCKETS = _impl.BUCKETS
CLIENT_STATES = _impl.CLIENT_STATES
WARM_PATH = _impl.WARM_PATH
ClientBase = _impl.ClientBase
Histogram = _impl.Histogram
PathsBase = _impl.PathsBase
PoolBase = _impl.PoolBase
RouteBase = _impl.RouteBase
RouterBase = _impl.RouterBase
ServerBase = _impl.ServerBase
StatusCounts = _impl.StatusCounts
UpstreamBase = _impl.UpstreamBase
WarmLease = _impl.WarmLease
warm_counts = _impl.warm_counts

assert BUCKETS == _native.BUCKETS, "proxy/_warm.c and proxy/_native.py disagree on the histogram buckets"


def warm_lease(board, slot: int, worker: int):
    """The gate's shared granted lease: the C one for the C board (the warm path uses it), the twin's
    for the twin's board."""
    if WarmLease is not _native.WarmLease and type(board).__module__ == "proxy._speedups":
        return WarmLease(board, slot, worker)
    return _native.WarmLease(board, slot, worker)


__all__ = ["ACCESS_FLUSH_BYTES", "AccessLogBase", "BUCKETS", "CLIENT_STATES", "WARM_PATH", "ClientBase", "Histogram", "PathsBase",
           "PoolBase", "RouteBase", "RouterBase", "ServerBase", "StatusCounts", "UpstreamBase", "WarmLease", "warm_counts", "warm_lease"]
