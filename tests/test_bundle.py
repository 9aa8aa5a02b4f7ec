"""Bundles: bit-identical output for identical content, all three formats extract, nothing escapes."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from cis490fleet import bundle, errors


def write_tree(root: Path, mtime: float) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "model.pt").write_bytes(bytes(range(256)) * 50)
    (root / "metrics.json").write_text('{"acc": 0.9}\n')
    (root / "sub" / "notes.txt").write_text("héllo\n", encoding="utf-8")
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o700)
    os.chmod(root / "metrics.json", 0o600)
    for path in [*root.rglob("*"), root]:
        os.utime(path, (mtime, mtime))
    return root


def test_identical_content_gives_identical_bundles(tmp_path):
    a = write_tree(tmp_path / "a", 1_000_000)
    b = write_tree(tmp_path / "b", 1_700_000_000.5)
    pa, sha_a, size_a = bundle.make_bundle(a, tmp_path / "out" / "a")
    pb, sha_b, size_b = bundle.make_bundle(b, tmp_path / "out" / "b")
    assert pa.read_bytes() == pb.read_bytes()
    assert sha_a == sha_b == hashlib.sha256(pa.read_bytes()).hexdigest()
    assert size_a == size_b == pa.stat().st_size
    assert not list((tmp_path / "out").glob("*.part"))


def test_different_content_gives_a_different_bundle(tmp_path):
    a = write_tree(tmp_path / "a", 0)
    b = write_tree(tmp_path / "b", 0)
    (b / "metrics.json").write_text('{"acc": 0.8}\n')
    assert bundle.make_bundle(a, tmp_path / "a")[1] != bundle.make_bundle(b, tmp_path / "b")[1]


def test_bundle_is_zstd_when_available_and_normalised(tmp_path):
    pytest.importorskip("zstandard")
    src = write_tree(tmp_path / "src", 12345)
    path, _, _ = bundle.make_bundle(src, tmp_path / "bundle")
    assert path.name == "bundle.tar.zst"
    assert path.read_bytes()[:4] == bundle.ZSTD_MAGIC
    import zstandard
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        raw = r.read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == ["metrics.json", "model.pt", "run.sh", "sub", "sub/deeper", "sub/deeper/empty", "sub/notes.txt"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
    modes = {m.name: m.mode for m in members}
    assert modes["metrics.json"] == 0o644 and modes["run.sh"] == 0o755 and modes["sub"] == 0o755


def test_roundtrip_restores_the_content(tmp_path):
    src = write_tree(tmp_path / "src", 5)
    path, _, _ = bundle.make_bundle(src, tmp_path / "bundle")
    out = bundle.extract_bundle(path, tmp_path / "out")
    for f in src.rglob("*"):
        if f.is_file():
            assert (out / f.relative_to(src)).read_bytes() == f.read_bytes()
    assert os.access(out / "run.sh", os.X_OK)


def test_plain_tar_without_zstandard(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "_zstandard", lambda: None)
    src = write_tree(tmp_path / "src", 5)
    path, sha, _ = bundle.make_bundle(src, tmp_path / "bundle")
    assert path.name == "bundle.tar"
    assert tarfile.is_tarfile(path)
    out = bundle.extract_bundle(path, tmp_path / "out")
    assert (out / "sub" / "notes.txt").read_text(encoding="utf-8") == "héllo\n"


def test_gzip_bundles_extract(tmp_path):
    src = write_tree(tmp_path / "src", 5)
    gz = tmp_path / "b.tar.gz"
    with gzip.open(gz, "wb") as g, tarfile.open(fileobj=g, mode="w") as tar:
        tar.add(src / "model.pt", arcname="model.pt")
    assert bundle.bundle_suffix(gz.read_bytes()[:4]) == ".tar.gz"
    out = bundle.extract_bundle(gz, tmp_path / "out")
    assert (out / "model.pt").read_bytes() == (src / "model.pt").read_bytes()


def test_suffix_by_magic_bytes():
    assert bundle.bundle_suffix(b"\x28\xb5\x2f\xfd rest") == ".tar.zst"
    assert bundle.bundle_suffix(b"\x1f\x8b\x08\x00") == ".tar.gz"
    assert bundle.bundle_suffix(b"mode") == ".tar"
    assert bundle.bundle_suffix(b"") == ".tar"


def evil_tar(tmp_path: Path, build) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return path


def add_file(tar, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_link(tar, name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


@pytest.mark.parametrize("build", [
    lambda t: add_file(t, "../escape.txt"),
    lambda t: add_file(t, "a/../../escape.txt"),
    lambda t: add_file(t, "/abs/escape.txt"),
    lambda t: add_link(t, "link", "/etc/passwd"),
    lambda t: add_link(t, "link", "../../outside"),
    lambda t: add_link(t, "hard", "/etc/passwd", tarfile.LNKTYPE),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-absolute", "symlink-up", "hardlink"])
def test_extraction_refuses_escapes(tmp_path, build):
    path = evil_tar(tmp_path, build)
    dest = tmp_path / "dest"
    with pytest.raises(errors.IntegrityError, match="refusing"):
        bundle.extract_bundle(path, dest)
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "outside").exists()


def test_links_inside_the_folder_survive(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "epoch3.pt").write_bytes(b"weights")
    (src / "best.pt").symlink_to("epoch3.pt")
    path, _, _ = bundle.make_bundle(src, tmp_path / "bundle")
    out = bundle.extract_bundle(path, tmp_path / "out")
    assert (out / "best.pt").is_symlink() and (out / "best.pt").read_bytes() == b"weights"


def test_links_out_of_the_folder_are_not_bundled(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "secret").write_text("s")
    (src / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(errors.BadRequest, match="outside"):
        bundle.make_bundle(src, tmp_path / "bundle")
    assert not list(tmp_path.glob("bundle*"))


def test_garbage_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(errors.IntegrityError, match="not a readable tar"):
        bundle.extract_bundle(path, tmp_path / "out")


def test_damaged_zstd_stream_is_a_clear_error(tmp_path):
    pytest.importorskip("zstandard")
    path = tmp_path / "junk.tar.zst"
    path.write_bytes(bundle.ZSTD_MAGIC + b"not a zstd frame" * 40)
    with pytest.raises(errors.IntegrityError, match="not a readable tar"):
        bundle.extract_bundle(path, tmp_path / "out")


def test_missing_source_folder(tmp_path):
    with pytest.raises(errors.BadRequest, match="not a folder"):
        bundle.make_bundle(tmp_path / "nope", tmp_path / "b")


@pytest.mark.parametrize("with_zstd", [True, False])
def test_bundle_bytes_equal_a_tarfile_stream_of_the_same_entries(tmp_path, monkeypatch, with_zstd):
    """make_bundle feeds tarfile and zstd in large writes; the bytes must stay those of the plain
    stream-mode recipe (tarfile "w|" into a default zstd stream), so existing artifact ids keep matching."""
    if with_zstd:
        zstandard = pytest.importorskip("zstandard")
    else:
        monkeypatch.setattr(bundle, "_zstandard", lambda: None)
    src = write_tree(tmp_path / "src", mtime=1_000_000)
    (src / "big.bin").write_bytes(os.urandom(3 * bundle.CHUNK + 12345))
    path, sha, size = bundle.make_bundle(src, tmp_path / "b")

    ref = io.BytesIO()
    out = zstandard.ZstdCompressor(level=bundle.ZSTD_LEVEL).stream_writer(ref, closefd=False) if with_zstd else ref
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for arcname, entry in bundle._entries(src):
            info = bundle._tarinfo(arcname, entry, src)
            if info.isreg():
                with open(entry, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    if with_zstd:
        out.close()
    assert path.read_bytes() == ref.getvalue()
    assert (sha, size) == (hashlib.sha256(ref.getvalue()).hexdigest(), len(ref.getvalue()))
