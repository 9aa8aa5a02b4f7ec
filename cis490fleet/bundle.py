"""Model bundles: a deterministic tar (zstd-compressed when available) of a trainer's output folder.

The same folder content gives the same bundle bytes whatever the files' mtimes,
owners or umask, so bit-identical re-runs deduplicate in the artifact store.
Extraction refuses anything that would land outside the destination. Never
reads the whole bundle into memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import stat
import sys
import tarfile
import threading
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cis490fleet import errors

CHUNK = 1 << 20
ZSTD_LEVEL = 3
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


def _zstandard():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


class NoZstdDecoder(errors.FleetError):
    """A .tar.zst bundle, and neither ``zstandard`` nor the standard library's ``compression.zstd`` (3.14+) here."""

    code = "no_zstd"


def _zstd_reader(f: BinaryIO, path: Path) -> tuple[BinaryIO, tuple[type[BaseException], ...]]:
    """A decompressing reader over ``f`` and the errors a damaged stream raises: ``zstandard`` when installed,
    else ``compression.zstd``; NoZstdDecoder, naming both fixes, when neither is here."""
    zstd = _zstandard()
    if zstd is not None:
        return zstd.ZstdDecompressor().stream_reader(f, read_size=CHUNK), (zstd.ZstdError,)
    try:
        from compression import zstd as std_zstd
    except ImportError:
        raise NoZstdDecoder(
            f"{path} is zstd-compressed and this Python ({sys.version.split()[0]}) cannot decompress it: "
            f"install zstandard ({Path(sys.executable).name} -m pip install zstandard), use Python >= 3.14, "
            "or fetch without --extract") from None
    return std_zstd.ZstdFile(f, "rb"), (std_zstd.ZstdError,)


def bundle_suffix(first_bytes: bytes) -> str:
    """``.tar.zst``, ``.tar.gz`` or ``.tar``, from a bundle's first (at least 4) bytes."""
    if first_bytes[:4] == ZSTD_MAGIC:
        return ".tar.zst"
    if first_bytes[:2] == GZIP_MAGIC:
        return ".tar.gz"
    return ".tar"


class _HashingWriter(io.RawIOBase):
    """Writes through to a file while a second thread hashes and counts, so the bundle is read once
    and the sha256 overlaps compression (hashlib and zstd both release the GIL on large buffers)."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0
        self._pending: queue.Queue = queue.Queue(maxsize=8)
        self._hasher = threading.Thread(target=self._hash, name="bundle-sha256", daemon=True)
        self._hasher.start()

    def _hash(self) -> None:
        while (data := self._pending.get()) is not None:
            self.sha.update(data)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        data = bytes(data)
        self.raw.write(data)
        self._pending.put(data)
        self.size += len(data)
        return len(data)

    def hexdigest(self) -> str:
        """The sha256 of everything written; also ends the hashing thread (call it once, also on failure)."""
        if self._hasher.is_alive():
            self._pending.put(None)
            self._hasher.join()
        return self.sha.hexdigest()


def _entries(src: Path) -> list[tuple[str, Path]]:
    """(archive name, path) of everything under ``src``, sorted, parents before children."""
    out = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames.sort()
        rel = Path(dirpath).relative_to(src)
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            arcname = (rel / name).as_posix()
            out.append((arcname, path))
    out.sort(key=lambda e: PurePosixPath(e[0]).parts)
    return out


def _tarinfo(arcname: str, path: Path, src: Path) -> tarfile.TarInfo:
    st = path.lstat()
    info = tarfile.TarInfo(arcname)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        resolved = (path.parent / target).resolve()
        if os.path.isabs(target) or not resolved.is_relative_to(src.resolve()):
            raise errors.BadRequest(
                f"cannot bundle {path}: it is a symbolic link to {target}, outside {src}; "
                "write the file itself into the output folder")
        info.type = tarfile.SYMTYPE
        info.linkname = PurePosixPath(*Path(target).parts).as_posix()
        info.mode = 0o777
    else:
        raise errors.BadRequest(f"cannot bundle {path}: not a regular file, folder or link; remove it from the output folder")
    return info


def make_bundle(src_dir: str | os.PathLike, dest_path_without_ext: str | os.PathLike) -> tuple[Path, str, int]:
    """Bundle ``src_dir`` into ``dest + suffix``; returns (path, sha256, size)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise errors.BadRequest(f"cannot bundle {src}: not a folder")
    zstd = _zstandard()
    dest = Path(str(dest_path_without_ext) + (".tar.zst" if zstd else ".tar"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    sink = None
    try:
        with open(tmp, "wb") as raw:
            sink = _HashingWriter(raw)
            out = (zstd.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(sink, closefd=False, write_size=CHUNK)
                   if zstd else sink)
            # "w", not the stream mode "w|": the same bytes, but file data goes to zstd in 1 MiB
            # writes instead of through tarfile's 10 KiB record buffer, which re-copies on every write.
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                              copybufsize=CHUNK) as tar:
                for arcname, path in _entries(src):
                    info = _tarinfo(arcname, path, src)
                    if info.isreg():
                        with open(path, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
            if zstd:
                out.close()
            raw.flush()
            os.fsync(raw.fileno())
            sha = sink.hexdigest()
        os.replace(tmp, dest)
    except BaseException:
        if sink is not None:
            sink.hexdigest()
        tmp.unlink(missing_ok=True)
        raise
    return dest, sha, sink.size


def _open_stream(f: BinaryIO, path: Path) -> tuple[BinaryIO, tuple[type[BaseException], ...]]:
    """The tar stream inside ``f`` and the errors its decompressor raises on damage."""
    head = f.read(4)
    f.seek(0)
    suffix = bundle_suffix(head)
    if suffix == ".tar.zst":
        return _zstd_reader(f, path)
    if suffix == ".tar.gz":
        import gzip
        import zlib
        return gzip.GzipFile(fileobj=f, mode="rb"), (gzip.BadGzipFile, EOFError, zlib.error)
    return f, ()


def _check_member(member: tarfile.TarInfo, dest: Path, path: Path) -> None:
    name = PurePosixPath(member.name)
    target = (dest / member.name).resolve()
    if name.is_absolute() or ".." in name.parts or not target.is_relative_to(dest):
        raise errors.IntegrityError(f"bundle {path} holds {member.name!r}, which would land outside {dest}; refusing it")
    if member.issym():
        link = PurePosixPath(member.linkname)
        resolved = (target.parent / member.linkname).resolve()
        if link.is_absolute() or not resolved.is_relative_to(dest):
            raise errors.IntegrityError(
                f"bundle {path} holds a link {member.name!r} -> {member.linkname!r} pointing outside {dest}; refusing it")
    elif not (member.isreg() or member.isdir()):
        raise errors.IntegrityError(
            f"bundle {path} holds {member.name!r}, which is not a file, folder or symbolic link; refusing it")


MAX_EXTRACT_CAP = 64 << 30
MAX_EXTRACT_FLOOR = 1 << 30
MAX_EXTRACT_RATIO = 200
TAR_HEADER = 512  # what one member costs at least, so a million empty files count too


def default_max_extract(bundle_size: int) -> int:
    """How far a bundle of ``bundle_size`` bytes may expand: 200x its size, at least 1 GiB (small bundles of
    highly compressible weights), at most 64 GiB."""
    return min(MAX_EXTRACT_CAP, max(MAX_EXTRACT_FLOOR, MAX_EXTRACT_RATIO * bundle_size))


def extract_bundle(path: str | os.PathLike, dest: str | os.PathLike, *, max_bytes: int | None = None) -> Path:
    """Extract a bundle (any of the three formats) into ``dest``; returns ``dest``.

    Members go into a fresh folder next to ``dest`` that takes its name only once all of them are out, so a
    refusal (an escape, garbage, more than ``max_bytes`` expanded: TooLarge) or a crash leaves nothing
    behind. The limit is checked from each member's header before its bytes are written. NoZstdDecoder
    leaves no folder either.
    """
    import shutil
    import tempfile

    path, dest = Path(path), Path(dest)
    limit = default_max_extract(path.stat().st_size) if max_bytes is None else max_bytes
    with open(path, "rb") as f:
        stream, damaged = _open_stream(f, path)
        unreadable = (tarfile.TarError,) + damaged
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extracting-", dir=dest.parent)).resolve()
        os.chmod(work, 0o755)  # mkdtemp makes it 0700; it becomes the folder the user asked for
        try:
            total = 0
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    _check_member(member, work, path)
                    total += TAR_HEADER + max(member.size, 0)
                    if total > limit:
                        raise errors.TooLarge(
                            f"bundle {path} would expand to more than {limit} bytes; refusing it (nothing was "
                            "extracted). If it is yours and the disk has room, raise --max-extract")
                    tar.extract(member, work, filter="data")
            _swap_in(work, dest)
        except unreadable as err:
            raise errors.IntegrityError(f"bundle {path} is not a readable tar archive ({err})") from None
        finally:
            if stream is not f:
                stream.close()
            shutil.rmtree(work, ignore_errors=True)
    return dest


def _swap_in(work: Path, dest: Path) -> None:
    """Give ``work`` the name ``dest``; an earlier extraction of the same bundle there is replaced."""
    import shutil

    if not dest.exists():
        os.rename(work, dest)
        return
    old = dest.with_name(f".{dest.name}.replaced-{os.getpid()}")
    os.rename(dest, old)
    os.rename(work, dest)
    shutil.rmtree(old, ignore_errors=True)
