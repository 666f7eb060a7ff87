"""What a snapshot costs: the bytes its files take on disk (sparse holes not counted) and the bytes
of them held in memory (page cache or tmpfs), which a restore maps or reads without touching a disk.

Residency is asked of the kernel with mincore(2) over a read-only shared mapping, the way
``fincore`` (util-linux) does; nothing is read, so asking never pulls a file into memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path
from typing import Iterable, NamedTuple

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value


class Footprint(NamedTuple):
    disk_bytes: int  # allocated on disk (st_blocks), so a sparse RAM file counts what the guest touched
    resident_bytes: int  # of those, the pages in memory now


def resident_bytes(path: str | os.PathLike) -> int:
    """Bytes of the file in memory now (0 for a missing or empty file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, MAP_FAILED):
            return 0
        try:
            pages = (size + PAGE - 1) // PAGE
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vector) != 0:
                return 0
            return (pages - bytes(vector).count(0)) * PAGE  # mincore sets bit 0 of a resident page's byte
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def footprint(paths: Iterable[str | os.PathLike]) -> Footprint:
    """The snapshot made of these files (missing ones count 0)."""
    disk = resident = 0
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        disk += st.st_blocks * 512
        resident += min(resident_bytes(path), st.st_blocks * 512 or st.st_size)
    return Footprint(disk, resident)


def files_under(folder: str | os.PathLike) -> list[Path]:
    """Every regular file in a snapshot folder (a CRIU image directory)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return [p for p in root.rglob("*") if p.is_file()]
