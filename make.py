#!/usr/bin/env python3
"""Set up the development environment from nothing but python3, then run one task.

    python3 make.py demo    # local fleet on loopback trains etc/demo_manifest.toml to completion
    python3 make.py test    # the whole test suite (what .ci/run calls)
    python3 make.py soak    # the long randomized runs, excluded from `test`
    python3 make.py bench   # bench/run.py
    python3 make.py zipapp  # dist/cis490fleet.pyz

The environment lives in .venv/ and is rebuilt when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".cis490fleet-setup"
EXTRAS = {"demo": "train", "test": "dev,train,bench", "soak": "dev,train,bench", "bench": "dev,train,bench", "zipapp": ""}


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(extras: str) -> Path:
    if sys.version_info < (3, 11):
        sys.exit(f"cis490fleet needs Python >= 3.11; this is {sys.version.split()[0]}. Run make.py with a newer python3.")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    have = STAMP.read_text().split() if STAMP.exists() else []
    if want in have:
        return venv_python()
    if not venv_python().exists():
        print(f"make.py: creating {VENV.name}/", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    py = str(venv_python())
    target = f".[{extras}]" if extras else "."
    print(f"make.py: installing {target} (first run takes a few minutes)", flush=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", target],
                   check=True, cwd=ROOT)
    STAMP.write_text(" ".join(have + [want]))
    return venv_python()


# Commands some tests need, and the Debian package that brings each: the dashboard's browser test
# drives Chromium; the enroll tests score the units with systemd-analyze and watch file modes with strace.
TEST_TOOLS = {"chromium": "chromium", "systemd-analyze": "systemd", "strace": "strace"}


def ensure_test_tools() -> None:
    """Install the missing TEST_TOOLS where we may (root with apt-get); their tests skip, saying why, elsewhere."""
    missing = sorted({pkg for cmd, pkg in TEST_TOOLS.items() if not shutil.which(cmd)})
    if not missing or os.name == "nt":
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"make.py: installing {' '.join(missing)} for the tests", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=False,
                       stdout=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    task, rest = argv[0], argv[1:]
    py = str(ensure_venv(EXTRAS[task]))
    if task == "test":
        ensure_test_tools()
        return subprocess.call([py, "-m", "pytest", *rest], cwd=ROOT)
    if task == "soak":
        return subprocess.call([py, "-m", "pytest", "-m", "soak", "-o", "addopts=", "-p", "no:cacheprovider", *rest], cwd=ROOT)
    if task == "demo":
        return subprocess.call([py, str(ROOT / "scripts" / "demo.py"), *rest], cwd=ROOT)
    if task == "bench":
        return subprocess.call([py, str(ROOT / "bench" / "run.py"), *rest], cwd=ROOT)
    if task == "zipapp":
        return subprocess.call([py, str(ROOT / "build_zipapp.py"), *rest], cwd=ROOT)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
