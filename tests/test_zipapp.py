"""The zipapp: reproducible bytes, only the package inside, and it runs on a bare interpreter."""

from __future__ import annotations

import hashlib
import importlib.util
import marshal
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cis490fleet
from cis490fleet import bytecode_cache, zipbuild

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    return zipbuild.build(tmp_path_factory.mktemp("dist") / "cis490fleet.pyz", git_commit=COMMIT)


def bare_env() -> dict:
    return {"PATH": os.environ.get("PATH", os.defpath)}


def run_pyz(pyz: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", str(pyz), *args], cwd=cwd, env=bare_env(), capture_output=True,
                          text=True, timeout=120)


def test_two_builds_in_different_folders_are_identical(tmp_path, pyz):
    again = zipbuild.build(tmp_path / "elsewhere" / "x.pyz", git_commit=COMMIT)
    assert hashlib.sha256(again.read_bytes()).hexdigest() == hashlib.sha256(pyz.read_bytes()).hexdigest()
    assert zipbuild.build(git_commit=COMMIT) == pyz.read_bytes()
    assert zipbuild.build(git_commit="another") != pyz.read_bytes()


def test_layout_is_normalised(pyz):
    data = pyz.read_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    assert os.access(pyz, os.X_OK)
    with zipfile.ZipFile(pyz) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        assert "__main__.py" in names and "cis490fleet/cli.py" in names and "cis490fleet/_build.py" in names
        for info in infos:
            assert info.date_time == (1980, 1, 1, 0, 0, 0), info.filename
            assert (info.create_system, info.external_attr >> 16) == (3, 0o100644), info.filename
        build = zf.read("cis490fleet/_build.py").decode()
    assert f"GIT_COMMIT = {COMMIT!r}" in build and f"VERSION = {cis490fleet.__version__!r}" in build


def test_only_package_sources_and_assets_inside(pyz):
    package = Path(cis490fleet.__file__).parent
    with zipfile.ZipFile(pyz) as zf:
        names = set(zf.namelist())
    for name in names:
        assert name == "__main__.py" or name.startswith("cis490fleet/"), name
        assert "__pycache__" not in name and not name.endswith((".pyc", ".pyo")), name
        assert not name.split("/")[-1].startswith("test_") and "/tests/" not in name, name
        if not name.startswith(tuple(f"cis490fleet/{folder}/" for folder in zipbuild.ASSET_DIRS)):
            assert name.endswith(".py"), name
    expected = {f"cis490fleet/{p.name}" for p in package.glob("*.py") if p.name != "_build.py"}
    assert expected <= names
    for folder in zipbuild.ASSET_DIRS:
        assets = {f"cis490fleet/{folder}/{p.relative_to(package / folder).as_posix()}"
                  for p in (package / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}
        assert assets and assets <= names, folder


def test_a_worker_anywhere_finds_the_shipped_tables_inside_the_zipapp(tmp_path, pyz):
    """`data = "package:iris.csv"` in a job's hyper needs no file on the worker: the zipapp carries the table."""
    pytest.importorskip("torch")
    proc = run_pyz(pyz, "train", "--model", "logreg", "--hyper", '{"epochs": 1, "data": "package:iris.csv"}',
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train=120 val=30" in (tmp_path / "out" / "train.log").read_text()


def test_version_on_a_bare_interpreter_in_an_empty_folder(tmp_path, pyz):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_pyz(pyz, "--version", cwd=empty)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cis490fleet {cis490fleet.__version__} ({COMMIT})"
    assert list(empty.iterdir()) == []


def test_the_zipapp_is_directly_executable(tmp_path, pyz):
    if os.name == "nt" or shutil.which("python3") is None:
        pytest.skip("needs a python3 on PATH for the shebang")
    probe = subprocess.run(["python3", "-c", "import sys; print(sys.version_info >= (3, 11))"], capture_output=True,
                           text=True, timeout=60)
    if probe.stdout.strip() != "True":
        pytest.skip("the python3 on PATH is older than 3.11")
    proc = subprocess.run([str(pyz), "--version"], cwd=tmp_path, env=bare_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert COMMIT in proc.stdout


def test_manifest_check_runs_from_the_zipapp(tmp_path, pyz):
    example = ROOT / "etc" / "demo_manifest.toml"
    if importlib.util.find_spec("cis490fleet.manifest_cmd") is None or not example.exists():
        pytest.skip("manifest check or its example is not there yet")
    proc = run_pyz(pyz, "manifest", "check", str(example), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_a_zipapp_rebuilds_itself_byte_for_byte(tmp_path, pyz):
    """What GET /v1/zipapp serves from a coordinator that runs from the zipapp."""
    code = ("import sys\nsys.path.insert(0, sys.argv[1])\nfrom cis490fleet import zipbuild\n"
            "assert zipbuild.__file__.startswith(sys.argv[1]), zipbuild.__file__\n"
            "sys.stdout.buffer.write(zipbuild.build())\n")
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(pyz)], cwd=tmp_path, env=bare_env(),
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == pyz.read_bytes()


def test_build_script_prints_sha256_and_path(tmp_path):
    out = tmp_path / "dist" / "fleet.pyz"
    proc = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "-o", str(out), "--git-commit", COMMIT],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    digest, path = proc.stdout.split()
    assert Path(path) == out and digest == hashlib.sha256(out.read_bytes()).hexdigest()
    assert not list(out.parent.glob(".*.part"))


def test_commit_comes_from_git_when_not_given():
    commit = zipbuild.detect_git_commit()
    assert commit
    if shutil.which("git") and (ROOT / ".git").exists():
        sha = commit.removesuffix("-dirty")
        assert len(sha) == 40
        known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{sha}^{{commit}}"], timeout=60)
        assert known.returncode == 0, f"{sha} is not a commit of this checkout"


# -- the per-user cache of compiled modules (bytecode_cache) --

def run_cached(pyz: Path, *args: str, cwd: Path, cache: Path, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", *flags, str(pyz), *args], cwd=cwd,
                          env={**bare_env(), "CIS490_CACHE_DIR": str(cache)}, capture_output=True, text=True,
                          timeout=120)


def cache_entry(cache: Path, pyz: Path, module: str) -> Path:
    origin = f"{pyz}{os.sep}cis490fleet{os.sep}{module}.py"
    with zipfile.ZipFile(pyz) as zf:
        source = zf.read(f"cis490fleet/{module}.py")
    return cache / bytecode_cache.entry_name(origin, source)


def test_compiled_modules_are_kept_per_user_and_read_on_the_next_start(tmp_path, pyz):
    cache = tmp_path / "cache"
    example = str(ROOT / "etc" / "demo_manifest.toml")
    first = run_cached(pyz, "manifest", "check", example, cwd=tmp_path, cache=cache)
    assert first.returncode == 0, first.stderr
    cli_entry, manifest_entry = cache_entry(cache, pyz, "cli"), cache_entry(cache, pyz, "manifest")
    for entry in (cli_entry, manifest_entry):
        code = marshal.loads(entry.read_bytes())
        assert code.co_filename.startswith(f"{pyz}{os.sep}cis490fleet{os.sep}")
    assert not any(p.name.endswith(".tmp") for p in cache.iterdir())

    # The next start executes what the cache holds: an entry replaced by other code runs that code.
    cli_entry.write_bytes(marshal.dumps(compile("def main():\n    print('from the cache')\n", "x", "exec")))
    second = run_cached(pyz, "manifest", "check", example, cwd=tmp_path, cache=cache)
    assert second.returncode == 0 and second.stdout == "from the cache\n", second.stderr

    # A damaged entry is compiled again and rewritten.
    cli_entry.write_bytes(b"\x00not marshal data")
    third = run_cached(pyz, "manifest", "check", example, cwd=tmp_path, cache=cache)
    assert third.returncode == 0 and third.stdout == first.stdout, third.stderr
    assert marshal.loads(cli_entry.read_bytes()).co_filename.endswith("cli.py")


def test_an_unusable_cache_folder_or_python_b_changes_nothing_but_speed(tmp_path, pyz):
    example = str(ROOT / "etc" / "demo_manifest.toml")
    plain = run_pyz(pyz, "manifest", "check", example, cwd=tmp_path)  # no HOME: no cache at all
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    blocked = run_cached(pyz, "manifest", "check", example, cwd=tmp_path, cache=not_a_folder)
    assert (blocked.returncode, blocked.stdout, blocked.stderr) == (0, plain.stdout, "")
    read_only = run_cached(pyz, "manifest", "check", example, cwd=tmp_path, cache=tmp_path / "b", flags=("-B",))
    assert (read_only.returncode, read_only.stdout) == (0, plain.stdout)
    assert not (tmp_path / "b").exists()


def test_cache_entries_are_named_by_interpreter_origin_and_source():
    name = bytecode_cache.entry_name("a.pyz/cis490fleet/m.py", b"x = 1\n")
    assert name == bytecode_cache.entry_name("a.pyz/cis490fleet/m.py", b"x = 1\n")
    assert name != bytecode_cache.entry_name("a.pyz/cis490fleet/m.py", b"x = 2\n")
    assert name != bytecode_cache.entry_name("b.pyz/cis490fleet/m.py", b"x = 1\n")


def test_cache_folder_follows_the_platform_conventions():
    assert bytecode_cache.cache_dir({"CIS490_CACHE_DIR": "/c", "HOME": "/h"}) == "/c"
    if os.name != "nt":
        assert bytecode_cache.cache_dir({"HOME": "/h"}) == os.path.join("/h", ".cache", "cis490fleet", "bytecode")
        assert bytecode_cache.cache_dir({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == os.path.join(
            "/x", "cis490fleet", "bytecode")
        assert bytecode_cache.cache_dir({}) is None
