"""Capability detection on this host, with fake nvidia-smi programs placed first on PATH."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cis490fleet import capability

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(os.name == "nt", reason="fake nvidia-smi scripts need a POSIX shebang")


def fake_smi(tmp_path: Path, body: str) -> Path:
    """A real program named nvidia-smi, first on PATH, running ``body`` (Python)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return bin_dir


@pytest.fixture
def smi_path(tmp_path, monkeypatch):
    def install(body: str) -> Path:
        bin_dir = fake_smi(tmp_path, body)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        return bin_dir
    return install


TWO_GPUS = """
    import sys
    assert "--query-gpu=index,name,memory.total" in sys.argv, sys.argv
    print("0, NVIDIA H200, 143771")
    print("1, Tesla T4, 15360")
"""


def test_this_host_without_a_gpu(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi here, whatever the host has
    caplog.set_level(logging.WARNING)
    cap = capability.detect(work_dir=str(tmp_path), timeout=120)
    assert cap["host"] == platform.node()
    assert cap["os"] == platform.system().lower()
    assert cap["python"] == platform.python_version()
    assert cap["cores"] >= 1
    assert cap["ram_gib"] > 0
    assert cap["disk_free_gib"] > 0
    assert cap["git_commit"] is None
    assert cap["slots"] == 1
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    assert cap["torch"] == torch_version
    assert (cap["cuda"], cap["gpus"], cap["vram_gib"]) == (False, [], 0.0)
    # No warning: with torch installed, the GPU probe ran in a child and answered.
    assert not [r for r in caplog.records if r.name == "cis490fleet.capability"]


def test_gpus_from_nvidia_smi(smi_path, tmp_path):
    smi_path(TWO_GPUS)
    cap = capability.detect(work_dir=str(tmp_path), timeout=30)
    assert cap["cuda"] is True
    assert cap["gpus"] == [{"index": 0, "name": "NVIDIA H200", "vram_gib": 140.4},
                           {"index": 1, "name": "Tesla T4", "vram_gib": 15.0}]
    assert cap["vram_gib"] == 140.4
    assert cap["slots"] == 2


def test_overrides_win(smi_path, tmp_path):
    smi_path(TWO_GPUS)
    cap = capability.detect({"cuda": False, "ram_gib": 1.5, "host": "pi4", "slots": 1, "torch": None},
                            work_dir=str(tmp_path), timeout=30)
    assert (cap["cuda"], cap["ram_gib"], cap["host"], cap["slots"], cap["torch"]) == (False, 1.5, "pi4", 1, None)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_hanging_nvidia_smi_is_killed_and_ignored(smi_path, tmp_path, caplog):
    pid_file = tmp_path / "smi.pid"
    smi_path(f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(600)
    """)
    caplog.set_level(logging.WARNING)
    cap = capability.detect(work_dir=str(tmp_path), timeout=3.0)
    assert cap["cuda"] is False and cap["gpus"] == []
    assert any("did not answer within 3.0 s" in r.getMessage() for r in caplog.records)
    for pid in map(int, pid_file.read_text().split()):
        assert wait_dead(pid), f"probe process {pid} outlived the timeout"


def wait_dead(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (an orphan waits for whoever reaps orphans here)."""
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_failing_nvidia_smi_fails_soft(smi_path, tmp_path, caplog):
    smi_path("""
        import sys
        print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver", file=sys.stderr)
        sys.exit(9)
    """)
    caplog.set_level(logging.WARNING)
    cap = capability.detect(work_dir=str(tmp_path), timeout=30)
    assert cap["cuda"] is False and cap["gpus"] == []
    assert any("couldn't communicate" in r.getMessage() for r in caplog.records)


def test_nvidia_smi_rows_parse():
    rows = "0, NVIDIA GeForce RTX 3090, 24576\n\ngarbage\nx, y, z\n1, Quadro, K, 8192\n"
    assert capability.parse_nvidia_smi(rows) == [
        {"index": 0, "name": "NVIDIA GeForce RTX 3090", "vram_gib": 24.0},
        {"index": 1, "name": "Quadro,K", "vram_gib": 8.0},
    ]


def test_git_commit_of_the_trainer_dir(smi_path, tmp_path):
    smi_path(TWO_GPUS)
    repo = tmp_path / "trainer"
    repo.mkdir()
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.invalid")
    for argv in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True, env=env)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    assert capability.detect(trainer_dir=str(repo), work_dir=str(tmp_path))["git_commit"] == head
    plain = tmp_path / "not-a-repo"
    plain.mkdir()
    assert capability.detect(trainer_dir=str(plain), work_dir=str(tmp_path))["git_commit"] is None


def test_cli_prints_json(smi_path, tmp_path):
    smi_path(TWO_GPUS)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "cis490fleet", "capability", "--work-dir", str(tmp_path),
                           "--timeout", "30"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cap = json.loads(proc.stdout)
    assert cap["cuda"] is True and cap["vram_gib"] == 140.4


def test_cli_rejects_a_bad_timeout(capsys):
    with pytest.raises(SystemExit) as exit_:
        capability.main(["--timeout", "-1"])
    assert exit_.value.code == 2
    assert "--timeout must be a positive number" in capsys.readouterr().err
