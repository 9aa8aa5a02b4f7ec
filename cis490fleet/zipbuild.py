"""Builds the one-file zipapp reproducibly: the same sources and commit give the same bytes.

Sources come from the imported ``cis490fleet`` package through
``importlib.resources``, so a coordinator that itself runs from the zipapp
rebuilds a byte-identical copy to serve at ``GET /v1/zipapp``. Entries are
sorted, dated 1980-01-01, with fixed permissions and a fixed "made by" system,
and stored uncompressed: deflate output differs between zlib builds (zlib-ng),
which would make the hash depend on the building machine. Only ``.py`` files
and the ``static/`` and ``data/`` assets go in; never tests, caches or bytecode.
"""

from __future__ import annotations

import importlib.resources
import io
import logging
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import cis490fleet

log = logging.getLogger(__name__)

PACKAGE = "cis490fleet"
SHEBANG = b"#!/usr/bin/env python3\n"
EPOCH = (1980, 1, 1, 0, 0, 0)
ENTRY_POINT = (b'"""Entry point of the cis490fleet zipapp."""\n\nfrom cis490fleet import bytecode_cache\n\n'
               b'bytecode_cache.install()\n\nfrom cis490fleet.cli import main  # noqa: E402\n\n'
               b'raise SystemExit(main())\n')
BUILD_MODULE = "_build.py"
ASSET_DIRS = ("static", "data", "windows")
"""The dashboard's files; the tables the built-in trainer ships (data/README.md); install-worker.ps1, which
coordinators serve to Windows hosts."""
UNIX = 3


def _walk(node, prefix: str, in_static: bool):
    for child in node.iterdir():
        name = child.name
        if name.startswith(".") or name == "__pycache__":
            continue
        path = f"{prefix}/{name}"
        if child.is_dir():
            yield from _walk(child, path, in_static or (prefix == PACKAGE and name in ASSET_DIRS))
        elif in_static and not name.endswith((".pyc", ".pyo")):
            yield path, child
        elif name.endswith(".py") and not (prefix == PACKAGE and name == BUILD_MODULE):
            yield path, child


def package_files() -> list[tuple[str, bytes]]:
    """(archive name, content) of every file the zipapp carries from the package, sorted by name."""
    root = importlib.resources.files(PACKAGE)
    return sorted((name, entry.read_bytes()) for name, entry in _walk(root, PACKAGE, False))


def _source_dir() -> Path | None:
    """The package folder when it lives on disk (not inside a zip)."""
    path = Path(cis490fleet.__file__).parent
    return path if path.is_dir() else None


def detect_git_commit() -> str:
    """HEAD of the checkout holding the package (``-dirty`` if the package has local changes),
    else the commit the running zipapp was built from, else ``unknown``."""
    src = _source_dir()
    git = shutil.which("git")
    if src is not None and git:
        try:
            head = subprocess.run([git, "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10)
            if head.returncode == 0 and head.stdout.strip():
                status = subprocess.run([git, "-C", str(src), "status", "--porcelain", "--", "."],
                                        capture_output=True, text=True, timeout=10)
                dirty = status.returncode == 0 and status.stdout.strip()
                return head.stdout.strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("could not ask git for the commit: %s", err)
    try:
        from cis490fleet import _build
        return str(_build.GIT_COMMIT)
    except ImportError:
        return "unknown"


def build_module(git_commit: str, version: str) -> bytes:
    return (f'"""Written when the zipapp was built; read by cli.version_string."""\n\n'
            f"GIT_COMMIT = {git_commit!r}\nVERSION = {version!r}\n").encode("utf-8")


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=EPOCH)
    info.create_system = UNIX
    info.external_attr = 0o100644 << 16
    info.compress_type = zipfile.ZIP_STORED
    return info


def build_bytes(*, git_commit: str | None = None) -> bytes:
    commit = git_commit if git_commit is not None else detect_git_commit()
    entries = package_files()
    entries.append(("__main__.py", ENTRY_POINT))
    entries.append((f"{PACKAGE}/{BUILD_MODULE}", build_module(commit, cis490fleet.__version__)))
    buffer = io.BytesIO()
    buffer.write(SHEBANG)
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in sorted(entries):
            zf.writestr(_entry(name), data)
    return buffer.getvalue()


def build(dest: str | os.PathLike | None = None, *, git_commit: str | None = None) -> bytes | Path:
    """The zipapp's bytes, or, given ``dest``, the executable file written there (atomically)."""
    data = build_bytes(git_commit=git_commit)
    if dest is None:
        return data
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
