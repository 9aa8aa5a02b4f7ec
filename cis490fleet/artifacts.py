"""The artifact store: content-addressed model bundles on disk, plus an append-only index.

Layout under the data folder: ``models/<model>_<mode>/<sha256>/bundle.<ext>``,
``models/index.jsonl`` (one JSON row per upload) and ``tmp/`` (uploads in
flight, on the same file system so the final rename is atomic). An upload is
streamed in fixed chunks, hashed as it arrives, fsynced, and only then renamed
into place; a bad upload leaves nothing behind. Never holds a bundle in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

from cis490fleet import errors
from cis490fleet.bundle import bundle_suffix
from cis490fleet.model import HOST_ID_RE, NAME_RE, SHA256_RE

log = logging.getLogger(__name__)

CHUNK = 1 << 20
INDEX_NAME = "index.jsonl"


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals the rename.
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(what: str, value: object, pattern) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise errors.BadRequest(
            f"{what} {value!r} is not valid: use letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def _check_sha(value: object) -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise errors.BadRequest(f"sha256 {value!r} is not valid: expected 64 lowercase hex digits")
    return value


class ArtifactStore:
    """Bundles under ``data_dir``. Safe to share between threads of one process.

    ``root`` names the folder: ``models`` for results, ``checkpoints`` for the checkpoints of
    unfinished attempts (same layout, same guarantees; only checkpoints are ever removed).
    """

    def __init__(self, data_dir: str | os.PathLike, root: str = "models"):
        self.data_dir = Path(data_dir)
        self.models_dir = self.data_dir / root
        self.tmp_dir = self.data_dir / "tmp"
        self.index_path = self.models_dir / INDEX_NAME
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._index_lock = threading.Lock()

    def clean_tmp(self) -> int:
        """Remove uploads left in flight by a crash; returns how many. Call at start-up only."""
        removed = 0
        for path in self.tmp_dir.iterdir():
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
            except OSError as err:
                log.warning("could not remove leftover upload %s: %s", path, err)
        if removed:
            log.info("removed %d leftover upload(s) from %s", removed, self.tmp_dir)
        return removed

    def put(self, fileobj: BinaryIO, *, sha256: str, length: int, model: str, mode: str, job_id: str,
            host: str, now: float) -> dict:
        """Store ``length`` bytes read from ``fileobj``, which must hash to ``sha256``."""
        _check_sha(sha256)
        _check_name("model", model, NAME_RE)
        _check_name("mode", mode, NAME_RE)
        _check_name("host", host, HOST_ID_RE)
        if not isinstance(job_id, str) or not job_id or len(job_id) > 128 or not job_id.isprintable():
            raise errors.BadRequest(f"job id {job_id!r} is not valid: expected a job id (64 hex digits)")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise errors.BadRequest(f"length {length!r} is not valid: expected a byte count >= 0")

        fd, tmp_name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.tmp_dir)
        tmp = Path(tmp_name)
        try:
            head = self._receive(fileobj, fd, sha256, length)
            folder = self.models_dir / f"{model}_{mode}" / sha256
            dest = folder / ("bundle" + bundle_suffix(head))
            deduplicated = self._place(tmp, dest, length)
        finally:
            tmp.unlink(missing_ok=True)
        rel = dest.relative_to(self.data_dir).as_posix()
        self._append_index({"artifact_id": sha256, "job_id": job_id, "model": model, "mode": mode, "host": host,
                            "size": length, "created": now, "path": rel})
        log.info("artifact %s for job %s from %s: %s (%d bytes)%s", sha256[:12], job_id[:12], host, rel, length,
                 ", deduplicated" if deduplicated else "")
        return {"artifact_id": sha256, "path": rel, "size": length, "deduplicated": deduplicated}

    def _receive(self, fileobj: BinaryIO, fd: int, sha256: str, length: int) -> bytes:
        """Copy and hash the body into ``fd`` (closed here); returns its first bytes."""
        digest = hashlib.sha256()
        head = b""
        got = 0
        # One buffer for the whole body when the source can fill it: a fresh 1 MiB bytes object per
        # chunk costs an mmap, its page faults and an munmap each time.
        readinto = getattr(fileobj, "readinto", None)
        view = memoryview(bytearray(CHUNK)) if readinto is not None else None
        with os.fdopen(fd, "wb") as out:
            while got < length:
                want = min(CHUNK, length - got)
                if view is not None:
                    chunk = view[:readinto(view[:want]) or 0]
                else:
                    chunk = fileobj.read(want)
                if not chunk:
                    break
                if len(head) < 4:
                    head += bytes(chunk[:4 - len(head)])
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
            if got < length:
                raise errors.IntegrityError(
                    f"upload ended after {got} of the {length} bytes declared in content-length; send the whole bundle")
            actual = digest.hexdigest()
            if actual != sha256:
                raise errors.IntegrityError(
                    f"upload does not match its x-content-sha256: expected {sha256}, got {actual}; "
                    "the bundle was corrupted on the way or changed while being sent")
            out.flush()
            os.fsync(out.fileno())
        return head

    def _place(self, tmp: Path, dest: Path, length: int) -> bool:
        """Move a verified upload to ``dest``; True when an identical bundle was already there."""
        created = [p for p in (dest.parent.parent, dest.parent) if not p.exists()]
        dest.parent.mkdir(parents=True, exist_ok=True)
        for folder in created:
            _fsync_dir(folder.parent)
        try:
            os.link(tmp, dest)  # fails if a concurrent or earlier upload put it there first
        except FileExistsError:
            size = dest.stat().st_size
            if size == length:
                return True
            log.warning("artifact %s had %d bytes instead of %d; replacing it with the verified upload",
                        dest, size, length)
            os.replace(tmp, dest)
        except OSError:  # file systems without hard links
            if dest.exists() and dest.stat().st_size == length:
                return True
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        return False

    def _append_index(self, row: dict) -> None:
        """Append one row; a failed append (a full disk) is cut back off, so the next row starts on a line."""
        line = (json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._index_lock:
            fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
            try:
                end = os.fstat(fd).st_size
                try:
                    written = 0
                    while written < len(line):
                        written += os.write(fd, line[written:])
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, end)
                    raise
            finally:
                os.close(fd)

    def locate(self, artifact_id: str) -> Path | None:
        """The bundle file of ``artifact_id``, or None (also for a malformed id)."""
        if not isinstance(artifact_id, str) or not SHA256_RE.match(artifact_id):
            return None
        for folder in sorted(self.models_dir.glob(f"*/{artifact_id}")):
            for ext in (".tar.zst", ".tar.gz", ".tar"):
                path = folder / ("bundle" + ext)
                if path.is_file():
                    return path
        return None

    def remove(self, artifact_id: str) -> bool:
        """Delete the folder of ``artifact_id`` (the caller knows nothing refers to it); True when one was there.

        The index keeps its rows: it is the history of uploads, not a list of what is stored."""
        removed = False
        if not isinstance(artifact_id, str) or not SHA256_RE.match(artifact_id):
            return removed
        for folder in sorted(self.models_dir.glob(f"*/{artifact_id}")):
            try:
                shutil.rmtree(folder)
                removed = True
            except OSError as err:
                log.warning("could not remove %s: %s", folder, err)
        return removed

    def open_artifact(self, artifact_id: str) -> tuple[BinaryIO, int]:
        """An open binary file of the bundle and its size; the caller closes it."""
        _check_sha(artifact_id)
        path = self.locate(artifact_id)
        if path is None:
            raise errors.NotFound(f"artifact {artifact_id[:12]} is not in this store; check the id with 'jobs show'")
        f = open(path, "rb")
        return f, os.fstat(f.fileno()).st_size

    def index(self) -> Iterator[dict]:
        """Rows of ``index.jsonl`` in upload order; a torn last line (crash mid-append) is skipped."""
        try:
            f = open(self.index_path, encoding="utf-8")
        except FileNotFoundError:
            return
        with f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s line %d is not JSON (a torn write?); skipping it", self.index_path, number)
