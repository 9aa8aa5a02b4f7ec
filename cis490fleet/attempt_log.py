"""An attempt's whole train.log as the coordinator keeps it: gzip-compressed, bounded, reproducible.

A log over ``limit`` bytes keeps its first and last ``limit // 2`` bytes with one marker
line between them saying how much was cut, so a runaway trainer cannot fill the
coordinator's disk while the start (arguments, data) and the end (the error) stay.
Reads one file and writes one; never talks to the coordinator.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

LOG_LIMIT = 8 << 20  # bytes of train.log kept: the first and last half of it
GZIP_LEVEL = 6


def cut_marker(cut: int) -> bytes:
    return f"\n[... {cut} bytes of train.log cut here: the first and last parts are kept ...]\n".encode()


def pack(log_path: Path, dest: Path, limit: int = LOG_LIMIT) -> tuple[Path, str, int]:
    """Write ``log_path`` (missing: empty) gzip-compressed to ``dest``, cut to ``limit`` bytes; returns
    (dest, sha256, size). Equal logs give equal bytes (no name or time in the gzip header)."""
    try:
        f = open(log_path, "rb")
    except FileNotFoundError:
        f = None
    tmp = dest.with_name(dest.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=_Hashing(raw, digest), compresslevel=GZIP_LEVEL,
                           mtime=0) as gz:
            if f is not None:
                with f:
                    size = os.fstat(f.fileno()).st_size
                    if size <= limit:
                        _copy(f, gz, size)
                    else:
                        half = limit // 2
                        _copy(f, gz, half)
                        gz.write(cut_marker(size - 2 * half))
                        f.seek(size - half)
                        _copy(f, gz, half)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, dest)
    return dest, digest.hexdigest(), dest.stat().st_size


def _copy(src, dst, length: int) -> None:
    while length > 0:
        chunk = src.read(min(length, 1 << 20))
        if not chunk:
            return
        dst.write(chunk)
        length -= len(chunk)


class _Hashing:
    """A file object that hashes what goes through it."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()
