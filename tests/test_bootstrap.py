"""The enroll one-liners: the Linux line runs in a real bash against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import subprocess
from pathlib import Path

import pytest

from cis490fleet import errors
from cis490fleet.bootstrap import enroll_commands
from conftest import loopback_http

ROOT = Path(__file__).resolve().parent.parent
KEY = "0123456789abcdef" * 4  # what `jobs hosts add` prints: 64 hex digits
PYZ = b"PK\x03\x04 pretend zipapp bytes " * 100
SHA = hashlib.sha256(PYZ).hexdigest()
SCRIPT_SHA = hashlib.sha256(b"pretend install-worker.ps1").hexdigest()


@pytest.fixture
def zipapp_server():
    """A loopback HTTP server answering GET /v1/zipapp with PYZ."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = PYZ if self.path == "/v1/zipapp" else b""
            self.send_response(200 if body else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with loopback_http(Handler) as url:
        yield url


def run_linux_line(line: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``line`` in bash with a ``sudo`` on PATH that records its arguments, its standard input and the
    file it was given instead of installing for real on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    sudo = bin_dir / "sudo"
    sudo.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD.argv"\ncat > "$RECORD.stdin"\n'
                    'cp "$2" "$RECORD.pyz"\n')
    sudo.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    return proc, record


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("sha256sum")), reason="needs curl and sha256sum")
def test_linux_line_downloads_checks_the_pin_and_passes_the_key_on_stdin(zipapp_server, tmp_path):
    line = enroll_commands(zipapp_server, "ws1", KEY, SHA, SCRIPT_SHA)["linux"]
    proc, record = run_linux_line(line, tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = Path(f"{record}.argv").read_text().splitlines()
    assert argv[0] == "python3" and argv[2:] == [
        "enroll", "worker", "--receiver", zipapp_server, "--host", "ws1", "--host-key-file", "-",
        "--zipapp-sha256", SHA]
    assert KEY not in " ".join(argv)
    assert Path(f"{record}.stdin").read_text() == KEY + "\n"
    assert Path(f"{record}.pyz").read_bytes() == PYZ
    assert not Path(argv[1]).exists(), "the downloaded temporary file is removed afterwards"


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("sha256sum")), reason="needs curl and sha256sum")
def test_linux_line_runs_nothing_when_the_download_differs_from_the_pin(zipapp_server, tmp_path):
    line = enroll_commands(zipapp_server, "ws1", KEY, hashlib.sha256(b"another build").hexdigest(), SCRIPT_SHA)["linux"]
    proc, record = run_linux_line(line, tmp_path)
    assert proc.returncode != 0
    assert not Path(f"{record}.argv").exists(), "sudo must not run a zipapp that fails the pin"
    assert [p.name for p in tmp_path.iterdir()] == ["bin"], "the download is not left behind"


def test_https_receiver_restricts_curl_to_https_and_windows_line_runs_the_pinned_served_script():
    lines = enroll_commands("https://coord.lab:8445/", "ws-2", KEY, SHA, SCRIPT_SHA)
    assert "--proto =https" in lines["linux"] and "https://coord.lab:8445/v1/zipapp" in lines["linux"]
    windows = lines["windows"]
    assert "-Uri 'https://coord.lab:8445/v1/install-worker.ps1' -OutFile $s" in windows
    # The script's pin is checked before anything runs it; the key is piped, never an argument.
    assert windows.index(f"-ne '{SCRIPT_SHA}'") < windows.index("| & $s")
    assert f"'{KEY}' | & $s -Receiver 'https://coord.lab:8445' -HostId 'ws-2' -HostKeyFile - " \
           f"-ZipappSha256 {SHA} }}" in windows and windows.count(KEY) == 1
    assert "-Scope Process" in windows and "finally { Remove-Item -LiteralPath $s" in windows
    script = (ROOT / "cis490fleet" / "windows" / "install-worker.ps1").read_text()
    for param in ("$Receiver", "$HostId", "$HostKeyFile", "$ZipappSha256", "[switch]$Insecure"):
        assert param in script, param
    plain = enroll_commands("http://coord.lab:8445", "ws-2", KEY, SHA, SCRIPT_SHA)
    assert " -Insecure }" in plain["windows"] and "--proto" not in plain["linux"]


@pytest.mark.parametrize("receiver, host, key, sha, says", [
    ("https://c:1'; rm -rf /", "ws1", KEY, SHA, "receiver"),
    ("ftp://c:1", "ws1", KEY, SHA, "receiver"),
    ("https://c:1", "ws 1", KEY, SHA, "host"),
    ("https://c:1", "ws1", "short", SHA, "host key"),
    ("https://c:1", "ws1", KEY.upper(), SHA, "host key"),
    ("https://c:1", "ws1", KEY + "'$(id)'", SHA, "host key"),
    ("https://c:1", "ws1", KEY, SHA.upper(), "sha256"),
    ("https://c:1", "ws1", KEY, SHA + "'; iex", "sha256"),
])
def test_values_a_shell_would_misread_are_refused(receiver, host, key, sha, says):
    with pytest.raises(errors.BadRequest, match=says):
        enroll_commands(receiver, host, key, sha, SCRIPT_SHA)
    with pytest.raises(errors.BadRequest, match=says):
        enroll_commands(receiver, host, key, SHA, sha)


def test_linux_line_never_puts_the_key_in_an_argument_vector():
    line = enroll_commands("https://coord.lab:8445", "ws1", KEY, SHA, SCRIPT_SHA)["linux"]
    # The only place the key appears is the argument of the shell's built-in printf.
    assert line.count(KEY) == 1 and f"printf '%s\\n' {KEY} | sudo " in line
