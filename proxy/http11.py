"""The HTTP/1.1 head parser in use: the C extension, or its pure-Python twin.

``WAKEGATE_PUREPYTHON=1`` forces the twin (as msgpack's MSGPACK_PUREPYTHON
does); otherwise the twin is used only when the extension is missing.
"""

import os

from .errors import ProtocolError

if os.environ.get("WAKEGATE_PUREPYTHON", "") not in ("", "0"):
    from ._native import (
        CHUNKED,
        IMPLEMENTATION,
        MAX_HEAD_BYTES,
        UNTIL_CLOSE,
        ChunkedScanner,
        append_access_line,
        build_request,
        build_response,
        parse_request,
        parse_response,
    )
else:
    try:
        from ._speedups import (
            CHUNKED,
            IMPLEMENTATION,
            MAX_HEAD_BYTES,
            UNTIL_CLOSE,
            ChunkedScanner,
            append_access_line,
            build_request,
            build_response,
            parse_request,
            parse_response,
        )
    except ImportError:
        from ._native import (
            CHUNKED,
            IMPLEMENTATION,
            MAX_HEAD_BYTES,
            UNTIL_CLOSE,
            ChunkedScanner,
            append_access_line,
            build_request,
            build_response,
            parse_request,
            parse_response,
        )

__all__ = [
    "CHUNKED",
    "IMPLEMENTATION",
    "MAX_HEAD_BYTES",
    "UNTIL_CLOSE",
    "ChunkedScanner",
    "ProtocolError",
    "append_access_line",
    "build_request",
    "build_response",
    "parse_request",
    "parse_response",
]
