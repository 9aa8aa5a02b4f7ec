"""README.md's "An operator's day", pasted into a shell in order, runs without an error nobody asked for.

The block runs as one bash script in a folder laid out like a fresh clone after the
Quickstart: ``etc/`` from this checkout, ``dist/cis490fleet.pyz`` built from it, and a
``.venv/bin/python`` that is this interpreter. Only what a person does between the lines
is added: waiting until the coordinator answers, leaving ``jobs watch`` with Ctrl-C
after a few seconds, an ``$EDITOR`` that adds one job, and waiting until a job has
completed before fetching it. The port is a free one instead of 8445.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cis490fleet import zipbuild
from conftest import ROOT, clean_env

PRELUDE = r"""
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
wait_for_coordinator() {
    for _ in $(seq 300); do python3 dist/cis490fleet.pyz jobs status >/dev/null 2>&1 && return 0; sleep 0.2; done
    return 1
}
wait_for_completed() {
    for _ in $(seq 240); do
        python3 dist/cis490fleet.pyz jobs show "$1" --json \
            | python3 -c 'import json, sys; sys.exit(json.load(sys.stdin)["job"]["status"] != "completed")' && return 0
        sleep 0.5
    done
    return 1
}
"""

ADDED_JOB = '\n[[jobs]]\nname = "added-today"\nmodel = "logreg"\nmode = "train"\nhyper = { lr = 0.2, epochs = 2 }\n'


def operators_day() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## An operator's day"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README.md's operator's day has no ```sh block"
    return block.group(1).splitlines()


def as_script(lines: list[str], port: int) -> str:
    out = [PRELUDE]
    for number, line in enumerate(lines, 1):
        command = re.split(r"(?:^|\s)#", line.replace("127.0.0.1:8445", f"127.0.0.1:{port}"))[0].strip()
        if not command:
            continue
        fetched = re.search(r"jobs fetch (\S+)", command)
        if fetched:
            out.append(f'wait_for_completed {fetched.group(1)} || {{ echo "{fetched.group(1)} never completed" >&2; exit 1; }}')
        if re.search(r"jobs watch\b", command):
            command = "timeout --preserve-status -s INT 4 " + command
        if command.endswith("&"):
            out.append(command)
        else:
            out.append(f'{command} || {{ echo "README line failed (exit $?): {number}" >&2; exit 1; }}')
        if command.startswith("export CIS490_RECEIVER="):
            out.append('wait_for_coordinator || { echo "the coordinator never answered" >&2; exit 1; }')
    return "\n".join(out) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_operators_day_block_names_only_what_a_fresh_clone_has():
    """Every file the block reads is in the repository or made by a line before it (a manifest named in the
    block that nobody creates is the first thing a newcomer trips on)."""
    lines = operators_day()
    made = {"dist/cis490fleet.pyz", ".venv/bin/python"}
    for line in lines:
        command = line.split("#")[0].strip()
        if command.startswith("cp "):
            made.add(command.split()[-1])
            command = command.rsplit(None, 1)[0]
        for path in re.findall(r"(?<![\w/.-])((?:\.venv|dist|etc)/[\w./-]+|[\w-]+\.toml(?:\.example)?)", command):
            assert path in made or (ROOT / path).exists(), f"{path!r} in {line!r} does not exist at that point"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_the_operators_day_runs_as_pasted(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "etc", clone / "etc")
    zipbuild.build(clone / "dist" / "cis490fleet.pyz")
    venv_python = clone / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    venv_python.chmod(0o755)
    editor = tmp_path / "editor"
    editor.write_text(f"#!/bin/sh\ncat >> \"$1\" <<'EOF'\n{ADDED_JOB}EOF\n")
    editor.chmod(0o755)
    env = clean_env()
    env.update(EDITOR=str(editor), NO_COLOR="1")
    script = as_script(operators_day(), free_port())
    (tmp_path / "day.sh").write_text(script)

    proc = subprocess.run(["bash", str(tmp_path / "day.sh")], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=540, start_new_session=True)
    failed = re.search(r"README line failed \(exit (\d+)\): (\d+)", proc.stderr)
    where = f"README's line {operators_day()[int(failed.group(2)) - 1]!r} exited {failed.group(1)}\n" if failed else ""
    said = f"{where}--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, said
    assert "README line failed" not in proc.stderr, said
    assert "training_manifest.toml: ok" in proc.stdout, said
    assert "cancelled " in proc.stdout and "requeued " in proc.stdout, said
    assert re.search(r"manifest reloaded \(sha256 [0-9a-f]{16}\): 1 added", proc.stdout), said
    (extracted,) = [p for p in (clone / "models").iterdir() if p.is_dir()]
    assert (extracted / "metrics.json").is_file() and (extracted / "model.pt").is_file()
    assert os.path.isdir(clone / "fleet-data")
