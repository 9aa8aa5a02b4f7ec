"""A per-user cache of the zipapp's compiled modules, so a command does not compile its imports at every start.

``zipimport`` never writes bytecode and the zipapp carries none (the same sources
must give the same bytes), so without this every ``jobs`` or ``manifest check``
compiled each module it imported: about a third of its run time. The zipapp's
entry point calls ``install()``; modules of the package found inside a zip archive
are then compiled once and their code objects kept in the cache folder.

An entry's name hashes the interpreter's version, the module's path and its
source, so a rebuilt pyz, an edited module or another Python never reads a stale
entry. Entries are written to a temporary name and renamed, so concurrent starts
never read half a file; an entry that cannot be read is compiled again, and a
folder that cannot be written is simply not used.

The folder: ``$CIS490_CACHE_DIR``, else ``%LOCALAPPDATA%\\cis490fleet\\bytecode``
on Windows, else ``$XDG_CACHE_HOME/cis490fleet/bytecode`` (``~/.cache`` by
default). It must belong to the user running the pyz: its entries are executed.
``python -B`` reads the cache but never writes it.
"""

from __future__ import annotations

import marshal
import os
import sys
import zipimport
from hashlib import blake2b
from importlib.machinery import ModuleSpec

PACKAGE = "cis490fleet"


def cache_dir(environ=os.environ) -> str | None:
    """Where compiled modules are kept for this user, or None when there is no such place."""
    if environ.get("CIS490_CACHE_DIR"):
        return environ["CIS490_CACHE_DIR"]
    if os.name == "nt":
        base = environ.get("LOCALAPPDATA")
    else:
        base = environ.get("XDG_CACHE_HOME") or (os.path.join(environ["HOME"], ".cache") if environ.get("HOME")
                                                  else None)
    return os.path.join(base, PACKAGE, "bytecode") if base else None


def entry_name(origin: str, source: bytes) -> str:
    key = blake2b(digest_size=20)
    for part in (sys.version.encode(), origin.encode("utf-8", "surrogateescape"), source):
        key.update(len(part).to_bytes(8, "little"))
        key.update(part)
    return key.hexdigest() + ".bin"


def source_path(importer: zipimport.zipimporter, fullname: str) -> str:
    """Where a module's source sits in the archive, as a path through it (the module's ``__file__``)."""
    return f"{importer.archive}{os.sep}{importer.prefix}{fullname.rpartition('.')[2]}.py"


class CachingLoader:
    """zipimport's loader for one module, with compiled code read from and written to the cache folder.

    Everything but executing the module (``get_source`` for tracebacks,
    ``get_resource_reader``, ``get_data``) is zipimport's own.
    """

    def __init__(self, importer: zipimport.zipimporter, folder: str | None):
        self._importer = importer
        self._folder = folder

    def __getattr__(self, name: str):
        return getattr(self._importer, name)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        exec(self.get_code(module.__spec__.name), module.__dict__)

    def get_filename(self, fullname: str) -> str:
        return source_path(self._importer, fullname)  # zipimport's compiles the module to find out

    def get_code(self, fullname: str):
        origin = self.get_filename(fullname)
        try:
            source = self._importer.get_data(origin)
        except OSError:  # no source in the archive (bytecode only): zipimport's own way
            return self._importer.get_code(fullname)
        path = os.path.join(self._folder, entry_name(origin, source)) if self._folder else None
        if path is not None:
            try:
                with open(path, "rb") as f:
                    return marshal.loads(f.read())
            except (OSError, EOFError, ValueError, TypeError):
                pass
        code = compile(source, origin, "exec", dont_inherit=True)
        if path is not None and not sys.dont_write_bytecode:
            self._store(path, code)
        return code

    def _store(self, path: str, code) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(self._folder, mode=0o700, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(marshal.dumps(code))
            os.replace(tmp, path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass


class CachingFinder:
    """Finds the package's modules inside a zip archive and hands them to a ``CachingLoader``."""

    def __init__(self, folder: str | None):
        self.folder = folder
        self._importers: dict[str, zipimport.zipimporter | None] = {}

    def _importer(self, entry: str) -> zipimport.zipimporter | None:
        if entry not in self._importers:
            try:
                self._importers[entry] = zipimport.zipimporter(entry)
            except (zipimport.ZipImportError, OSError):
                self._importers[entry] = None
        return self._importers[entry]

    def find_spec(self, fullname: str, path=None, target=None):
        if not fullname.startswith(PACKAGE + ".") or not path:
            return None
        for entry in path:
            importer = self._importer(entry) if isinstance(entry, str) else None
            if importer is None:
                continue
            try:
                if importer.is_package(fullname):
                    return None  # packages load as zipimport loads them
            except zipimport.ZipImportError:
                continue
            # Not importer.find_spec: it asks get_filename for the origin, and zipimport compiles the module to
            # answer that (then compiles it again to run it).
            spec = ModuleSpec(fullname, CachingLoader(importer, self.folder), origin=source_path(importer, fullname))
            spec.has_location = True
            return spec
        return None

    def invalidate_caches(self) -> None:
        self._importers.clear()


def install(environ=os.environ) -> CachingFinder:
    """Put the caching finder first on ``sys.meta_path`` (once). Without a cache folder it still
    compiles each module once, where zipimport compiles it twice."""
    for finder in sys.meta_path:
        if isinstance(finder, CachingFinder):
            return finder
    finder = CachingFinder(cache_dir(environ))
    sys.meta_path.insert(0, finder)
    return finder
