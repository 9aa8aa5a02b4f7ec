"""A peer's own manifest file, and manifest texts turned into the command that puts them in force.

Adapter. The manifest in force is replicated state (``JobStore.manifest_info``,
applied by ``sync_manifest`` with the text it came from); this module only
reads this peer's ``--manifest`` when asked (a single coordinator's start, the
seed of a new group, a ``jobs reload`` without a FILE received here), parses a
text once per distinct text, and builds the ``sync_manifest`` command. It
never decides which manifest is in force.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cis490fleet import commands, errors
from cis490fleet import manifest as manifest_mod
from cis490fleet.model import Manifest


class ManifestTexts:
    """This peer's manifest file (may be None) and the parse of the last text seen."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._parsed: tuple[str, str, Manifest, dict] | None = None  # (sha256, name, parse, its to_json())

    def read(self) -> tuple[str, str]:
        """(text, name) of this peer's file; BadRequest without ``--manifest``, ManifestError when unreadable."""
        if self.path is None:
            raise errors.BadRequest("this peer was started without --manifest: send the manifest instead, "
                                    "e.g. jobs reload FILE")
        try:
            return self.path.read_bytes().decode("utf-8-sig"), os.fspath(self.path)
        except (OSError, UnicodeDecodeError):
            manifest_mod.load(self.path)  # raises the ManifestError naming the problem
            raise

    def file_sha256(self) -> str | None:
        """The sha256 of this peer's manifest text, None when there is no readable file."""
        try:
            return commands.manifest_sha256(self.read()[0])
        except errors.FleetError:
            return None

    def command(self, text: str, name: str, *, seed_only: bool = False) -> tuple[Manifest, dict]:
        """(the parse, the ``sync_manifest`` command) for ``text``; ManifestError naming every problem.

        The same text as last time reuses its parse, so a repeated reload costs only the sync."""
        sha = commands.manifest_sha256(text)
        with self._lock:
            cached = self._parsed
        if cached is not None and cached[:2] == (sha, name):
            loaded, as_json = cached[2], cached[3]
        else:
            loaded = manifest_mod.parse(text, name or "manifest")
            as_json = loaded.to_json()
            with self._lock:
                self._parsed = (sha, name, loaded, as_json)
        return loaded, {"op": "sync_manifest", "manifest": as_json, "source": {"text": text, "name": name},
                        "seed_only": seed_only}


def differs(name: str, file_sha: str, info: dict) -> str:
    """The warning for a peer whose manifest file is not the manifest in force."""
    return (f"manifest file {name} (sha256 {file_sha[:16]}) differs from the group's manifest (sha256 "
            f"{str(info.get('sha256'))[:16]}, from {info.get('name') or 'memory'}): the group's stays in force; "
            f"to apply this file run: jobs reload {name}")
