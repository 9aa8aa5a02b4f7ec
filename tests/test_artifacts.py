"""The artifact store: verified, atomic, deduplicated, and nothing escapes the data folder."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path

import pytest

from cis490fleet import errors
from cis490fleet.artifacts import ArtifactStore
from cis490fleet.bundle import make_bundle

JOB = "ab" * 32
ZSTD = b"\x28\xb5\x2f\xfd" + b"zstd frame, more or less" * 100
GZIP = b"\x1f\x8b\x08\x00" + b"gzip stream" * 100
TAR = b"plain tar bytes" * 100


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(store: ArtifactStore, data: bytes, **kw):
    args = dict(sha256=sha(data), length=len(data), model="mlp", mode="baseline", job_id=JOB, host="ws1", now=1000.0)
    args.update(kw)
    return store.put(io.BytesIO(data), **args)


def leftovers(store: ArtifactStore) -> list[Path]:
    return list(store.tmp_dir.iterdir())


@pytest.mark.parametrize("data,ext", [(ZSTD, "tar.zst"), (GZIP, "tar.gz"), (TAR, "tar")])
def test_put_stores_by_content_with_extension_from_magic_bytes(tmp_path, data, ext):
    store = ArtifactStore(tmp_path)
    result = put(store, data)
    assert result == {"artifact_id": sha(data), "path": f"models/mlp_baseline/{sha(data)}/bundle.{ext}",
                      "size": len(data), "deduplicated": False}
    assert (tmp_path / result["path"]).read_bytes() == data
    assert store.locate(sha(data)) == tmp_path / result["path"]
    f, size = store.open_artifact(sha(data))
    with f:
        assert (f.read(), size) == (data, len(data))
    assert not leftovers(store)


def test_index_rows(tmp_path):
    store = ArtifactStore(tmp_path)
    put(store, TAR, now=1234.5)
    rows = list(store.index())
    assert rows == [{"artifact_id": sha(TAR), "job_id": JOB, "model": "mlp", "mode": "baseline", "host": "ws1",
                     "size": len(TAR), "created": 1234.5, "path": f"models/mlp_baseline/{sha(TAR)}/bundle.tar"}]
    lines = (tmp_path / "models" / "index.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_reupload_deduplicates_and_still_indexes_the_new_job(tmp_path):
    store = ArtifactStore(tmp_path)
    first = put(store, ZSTD)
    second = put(store, ZSTD, job_id="cd" * 32, host="ws2", now=2000.0)
    assert not first["deduplicated"] and second["deduplicated"]
    assert first["path"] == second["path"]
    assert [r["job_id"] for r in store.index()] == [JOB, "cd" * 32]
    assert sum(p.stat().st_size for p in store.models_dir.glob("*/*/bundle.*")) == len(ZSTD)
    assert not leftovers(store)


def test_short_body_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(errors.IntegrityError, match=f"after {len(TAR) - 10} of the {len(TAR)} bytes"):
        store.put(io.BytesIO(TAR[:-10]), sha256=sha(TAR), length=len(TAR), model="mlp", mode="m", job_id=JOB,
                  host="ws1", now=0.0)
    assert not leftovers(store)
    assert store.locate(sha(TAR)) is None
    assert list(store.index()) == []
    assert not list((tmp_path / "models").glob("*/*"))


def test_sha_mismatch_names_both_and_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    wrong = "0" * 64
    with pytest.raises(errors.IntegrityError) as err:
        put(store, TAR, sha256=wrong)
    assert wrong in str(err.value) and sha(TAR) in str(err.value)
    assert not leftovers(store)
    assert list(store.index()) == []


def test_only_the_declared_length_is_read(tmp_path):
    store = ArtifactStore(tmp_path)
    body = io.BytesIO(TAR + b"next request on a keep-alive connection")
    store.put(body, sha256=sha(TAR), length=len(TAR), model="mlp", mode="m", job_id=JOB, host="ws1", now=0.0)
    assert body.read() == b"next request on a keep-alive connection"


class ReadSource:
    """4 MiB + 3 bytes produced on demand through read() only; records the largest read asked for."""

    def __init__(self, size):
        self.left, self.largest = size, 0

    def read(self, n=-1):
        self.largest = max(self.largest, n)
        n = min(n, self.left)
        self.left -= n
        return b"\xab" * n


class ReadintoSource(ReadSource):
    """The same through readinto(), as a socket's body reader offers it: the store reuses one buffer."""

    def __init__(self, size):
        super().__init__(size)
        self.buffers = set()

    def readinto(self, b):
        self.buffers.add(id(b.obj) if isinstance(b, memoryview) else id(b))
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


@pytest.mark.parametrize("source", [ReadSource, ReadintoSource])
def test_large_upload_streams_in_chunks(tmp_path, source):
    size = 4 * 2**20 + 3
    store = ArtifactStore(tmp_path)
    src = source(size)
    result = store.put(src, sha256=sha(b"\xab" * size), length=size, model="mlp", mode="m", job_id=JOB,
                       host="ws1", now=0.0)
    assert result["size"] == size and (tmp_path / result["path"]).stat().st_size == size
    assert 0 < src.largest <= 2**20
    if source is ReadintoSource:
        assert len(src.buffers) == 1


@pytest.mark.parametrize("field,value", [
    ("model", "../x"), ("model", "a/b"), ("model", "/etc"), ("model", ".."), ("model", ""),
    ("mode", "../../x"), ("mode", "a\\b"), ("host", "../ws"), ("host", "a/b"),
    ("sha256", "../" + "a" * 61), ("sha256", "A" * 64), ("sha256", "a" * 63),
    ("job_id", ""), ("length", -1),
])
def test_bad_names_are_refused_before_touching_disk(tmp_path, field, value):
    store = ArtifactStore(tmp_path)
    with pytest.raises(errors.BadRequest, match="not valid"):
        put(store, TAR, **{field: value})
    assert not leftovers(store)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["models", "tmp"]


def test_concurrent_uploads_of_the_same_bundle(tmp_path):
    store = ArtifactStore(tmp_path)
    data = bytes(range(256)) * 8192
    results, failures = [], []
    start = threading.Barrier(8)

    def upload(i):
        try:
            start.wait()
            results.append(put(store, data, job_id=f"{i:064x}"))
        except Exception as err:  # reported below
            failures.append(err)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert sum(not r["deduplicated"] for r in results) >= 1
    assert {r["path"] for r in results} == {f"models/mlp_baseline/{sha(data)}/bundle.tar"}
    assert (tmp_path / results[0]["path"]).read_bytes() == data
    assert len(list(store.index())) == 8
    assert not leftovers(store)


def test_clean_tmp_removes_crash_leftovers(tmp_path):
    store = ArtifactStore(tmp_path)
    (store.tmp_dir / "upload-123.part").write_bytes(b"half")
    (store.tmp_dir / "odd-dir").mkdir()
    assert store.clean_tmp() == 2
    assert not leftovers(store)
    assert store.clean_tmp() == 0


def test_open_missing_and_malformed(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(errors.NotFound):
        store.open_artifact("e" * 64)
    with pytest.raises(errors.BadRequest):
        store.open_artifact("../../etc/passwd")
    assert store.locate("../../etc/passwd") is None
    assert store.locate("e" * 64) is None


def test_torn_index_line_is_skipped(tmp_path):
    store = ArtifactStore(tmp_path)
    put(store, TAR)
    with open(store.index_path, "a") as f:
        f.write('{"artifact_id": "trunc')
    assert len(list(store.index())) == 1


def test_corrupt_existing_copy_is_replaced(tmp_path):
    store = ArtifactStore(tmp_path)
    path = tmp_path / put(store, TAR)["path"]
    path.write_bytes(TAR[:5])
    again = put(store, TAR)
    assert not again["deduplicated"]
    assert path.read_bytes() == TAR


def test_a_real_bundle_goes_in_and_comes_out(tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    (src / "model.pt").write_bytes(b"w" * 10000)
    path, digest, size = make_bundle(src, tmp_path / "bundle")
    store = ArtifactStore(tmp_path / "data")
    with open(path, "rb") as f:
        result = store.put(f, sha256=digest, length=size, model="mlp", mode="baseline", job_id=JOB, host="ws1",
                           now=1.0)
    assert result["path"].endswith("/bundle" + "".join(path.suffixes))
    assert store.locate(digest).read_bytes() == path.read_bytes()
