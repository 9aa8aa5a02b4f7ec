"""attempt_log.pack: an attempt's train.log as the coordinator keeps it (gzip, bounded, reproducible)."""

from __future__ import annotations

import gzip
import hashlib

from cis490fleet import attempt_log


def test_a_small_log_is_kept_whole_and_equal_logs_pack_to_equal_bytes(tmp_path):
    log = tmp_path / "train.log"
    log.write_bytes(b"epoch 1 loss 0.9\nTraceback (most recent call last):\nValueError: boom\n")
    path, sha, size = attempt_log.pack(log, tmp_path / "a.log.gz")
    data = path.read_bytes()
    assert gzip.decompress(data) == log.read_bytes()
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    again = attempt_log.pack(log, tmp_path / "b.log.gz")
    assert again[1] == sha and again[0].read_bytes() == data  # no name or time in the header


def test_a_log_over_the_limit_keeps_its_head_and_tail_with_a_marker(tmp_path):
    log = tmp_path / "train.log"
    lines = [f"line {i:06d}\n".encode() for i in range(100_000)]  # 1.2 MB
    log.write_bytes(b"".join(lines))
    path, _, size = attempt_log.pack(log, tmp_path / "cut.log.gz", limit=100_000)
    text = gzip.decompress(path.read_bytes())
    head, tail = text[:50_000], text[-50_000:]
    assert log.read_bytes().startswith(head) and log.read_bytes().endswith(tail)
    cut = len(log.read_bytes()) - 100_000
    assert text[50_000:-50_000] == attempt_log.cut_marker(cut)
    assert b"1100000 bytes of train.log cut here" in text
    assert size < 100_000


def test_a_missing_log_packs_as_empty(tmp_path):
    path, _, _ = attempt_log.pack(tmp_path / "never-written.log", tmp_path / "e.log.gz")
    assert gzip.decompress(path.read_bytes()) == b""
