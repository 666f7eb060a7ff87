"""Protocol errors raised by the HTTP/1.1 head parsers, in both implementations.

Each error carries the status a server should answer with (h11's
``error_status_hint``): 400 unless the rule that failed says otherwise.
"""


class ProtocolError(Exception):
    """Bytes that are not valid HTTP/1.1; ``status`` is the response to send."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):
        return (type(self), (self.args[0], self.status))
