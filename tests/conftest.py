"""Shared fixtures: both parser implementations, and the implementation the server uses."""

import importlib
import os

import pytest

PURE = os.environ.get("WAKEGATE_PUREPYTHON", "") not in ("", "0")


def _implementations():
    names = ["proxy._native"]
    if not PURE:
        # No silent fallback: when the C path is asked for, its absence is a failure.
        names.insert(0, "proxy._speedups")
    return names


@pytest.fixture(params=_implementations(), ids=lambda name: name.rsplit(".", 1)[1].lstrip("_"))
def http11(request):
    """Each parser implementation in turn: the C extension and the pure-Python twin."""
    return importlib.import_module(request.param)
