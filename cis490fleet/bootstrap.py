"""Ready-to-paste enrollment commands for a new worker host: pinned download, key on standard input.

Pure core: builds text from its arguments, never reads a file or a clock. The
Linux line downloads the zipapp from ``<receiver>/v1/zipapp`` into a private
temporary file, checks its sha256 against the pinned value before anything runs
it, and pipes the host key into ``enroll worker --host-key-file -`` through the
shell's built-in ``printf``, so the key never appears on a command line that
``ps`` shows. The Windows line pipes the key into ``install-worker.ps1``
(run from the folder that holds it), which downloads and checks the zipapp
against ``-ZipappSha256``. For an ``http://`` receiver the Linux line lets curl
use plain HTTP and the Windows line says ``-Insecure`` (the script refuses plain
HTTP without it): the pin still protects the zipapp, nothing else on that link.
"""

from __future__ import annotations

import re
import shlex

from cis490fleet import errors, signing
from cis490fleet.model import HOST_ID_RE

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# URLs and keys are pasted into two shells: refuse anything a quote, space or control character would break.
RECEIVER_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/\-]*)?$")


def _check(receiver: str, host: str, key: str, zipapp_sha256: str) -> str:
    if not isinstance(receiver, str) or not RECEIVER_RE.match(receiver):
        raise errors.BadRequest(f"receiver {receiver!r} is not a plain http:// or https:// URL "
                                "(e.g. https://coord.lab:8445); pass the coordinator's URL")
    if not isinstance(host, str) or not HOST_ID_RE.match(host):
        raise errors.BadRequest(f"host {host!r} is not a valid host id (letters, digits, '.', '_', '-', at most 63)")
    try:
        signing.parse_key(key if isinstance(key, str) else "", "the host key")
    except errors.ConfigError as err:
        raise errors.BadRequest(str(err)) from None
    if key != key.strip():
        raise errors.BadRequest("the host key has spaces around it; pass the 64 hex digits alone")
    if not isinstance(zipapp_sha256, str) or not SHA256_RE.match(zipapp_sha256):
        raise errors.BadRequest(f"zipapp sha256 {zipapp_sha256!r} is not 64 lowercase hex digits")
    return receiver.rstrip("/")


def _ps_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def enroll_commands(receiver: str, host: str, key: str, zipapp_sha256: str) -> dict[str, str]:
    """``{"linux": one line for a root-capable shell, "windows": one line for an elevated PowerShell}``."""
    base = _check(receiver, host, key, zipapp_sha256)
    insecure = base.startswith("http://")
    url = base + "/v1/zipapp"
    proto = "" if insecure else "--proto =https "
    enroll = (f"sudo python3 \"$f\" enroll worker --receiver {shlex.quote(base)} --host {shlex.quote(host)} "
              f"--host-key-file - --zipapp-sha256 {zipapp_sha256}")
    # A subshell, so the temporary file goes whatever happens and the line's exit status is enroll's.
    linux = (f"(f=$(mktemp) && trap 'rm -f \"$f\"' EXIT && curl -fsSL {proto}-o \"$f\" {shlex.quote(url)} && "
             f"echo \"{zipapp_sha256}  $f\" | sha256sum -c --quiet - && "
             f"printf '%s\\n' {shlex.quote(key)} | {enroll})")
    windows = (f"{_ps_quote(key)} | & .\\install-worker.ps1 -Receiver {_ps_quote(base)} -HostId {_ps_quote(host)} "
               f"-HostKeyFile - -ZipappSha256 {zipapp_sha256}" + (" -Insecure" if insecure else ""))
    return {"linux": linux, "windows": windows}
