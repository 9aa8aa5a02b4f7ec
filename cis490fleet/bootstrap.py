"""Ready-to-paste enrollment commands for a new worker host: pinned download, key on standard input.

Pure core: builds text from its arguments, never reads a file or a clock. The
Linux line downloads the zipapp from ``<receiver>/v1/zipapp`` into a private
temporary file, checks its sha256 against the pinned value before anything runs
it, and pipes the host key into ``enroll worker --host-key-file -`` through the
shell's built-in ``printf``, so the key never appears on a command line that
``ps`` shows. The Windows line downloads ``install-worker.ps1`` from
``<receiver>/v1/install-worker.ps1`` into a temporary file, checks its sha256
against its own pin before running it, and pipes the key into it; the script
downloads the zipapp and checks it against ``-ZipappSha256``. For an ``http://``
receiver the Linux line lets curl use plain HTTP and the Windows line says
``-Insecure`` (the script refuses plain HTTP without it): the pins still protect
what runs, nothing else on that link.
"""

from __future__ import annotations

import re
import shlex

from cis490fleet import errors, signing
from cis490fleet.model import HOST_ID_RE

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# URLs and keys are pasted into two shells: refuse anything a quote, space or control character would break.
RECEIVER_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/\-]*)?$")


def _check(receiver: str, host: str, key: str, *pins: str) -> str:
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
    for pin in pins:
        if not isinstance(pin, str) or not SHA256_RE.match(pin):
            raise errors.BadRequest(f"sha256 pin {pin!r} is not 64 lowercase hex digits")
    return receiver.rstrip("/")


def _ps_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def enroll_commands(receiver: str, host: str, key: str, zipapp_sha256: str, script_sha256: str) -> dict[str, str]:
    """``{"linux": one line for a root-capable shell, "windows": one line for an elevated PowerShell}``;
    ``script_sha256`` pins the install-worker.ps1 the receiver serves."""
    base = _check(receiver, host, key, zipapp_sha256, script_sha256)
    insecure = base.startswith("http://")
    url = base + "/v1/zipapp"
    proto = "" if insecure else "--proto =https "
    enroll = (f"sudo python3 \"$f\" enroll worker --receiver {shlex.quote(base)} --host {shlex.quote(host)} "
              f"--host-key-file - --zipapp-sha256 {zipapp_sha256}")
    # A subshell, so the temporary file goes whatever happens and the line's exit status is enroll's.
    linux = (f"(f=$(mktemp) && trap 'rm -f \"$f\"' EXIT && curl -fsSL {proto}-o \"$f\" {shlex.quote(url)} && "
             f"echo \"{zipapp_sha256}  $f\" | sha256sum -c --quiet - && "
             f"printf '%s\\n' {shlex.quote(key)} | {enroll})")
    # TLS 1.2 on for Windows PowerShell 5.1, scripts allowed in this process only, the script's pin checked
    # before it runs, and the temporary copy removed whatever happens.
    windows = ("$ErrorActionPreference = 'Stop'; "
               "[Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor 3072; "
               "Set-ExecutionPolicy -Scope Process -ExecutionPolicy Bypass -Force; "
               "$s = Join-Path $env:TEMP ('cis490fleet-install-' + [guid]::NewGuid() + '.ps1'); "
               f"try {{ Invoke-WebRequest -UseBasicParsing -Uri {_ps_quote(base + '/v1/install-worker.ps1')} "
               "-OutFile $s; "
               f"if ((Get-FileHash -Algorithm SHA256 -LiteralPath $s).Hash -ne '{script_sha256}') "
               "{ throw 'install-worker.ps1 does not match its pinned sha256: not run' }; "
               f"{_ps_quote(key)} | & $s -Receiver {_ps_quote(base)} -HostId {_ps_quote(host)} "
               f"-HostKeyFile - -ZipappSha256 {zipapp_sha256}" + (" -Insecure" if insecure else "") +
               " } finally { Remove-Item -LiteralPath $s -Force -ErrorAction SilentlyContinue }")
    return {"linux": linux, "windows": windows}
