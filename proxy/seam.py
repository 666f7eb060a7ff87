"""The one seam between the request path and the controller: what the proxy asks of a service.

A service offers ``acquire()``, which returns a lease (granted now, or held while the service
wakes) or raises ``Refused``; the lease's ``release()`` ends the request's claim; ``awake``
says whether a request would be served without a wake. proxy/gate.py implements it in every
proxy process, over the shared board (proxy/board.py) and a wake ask to controller/service.py.
"""

from __future__ import annotations


class Refused(Exception):
    """A held request that will not be served: answer ``status`` with ``retry_after`` seconds."""

    def __init__(self, status: int, reason: str, retry_after: float = 1.0) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
