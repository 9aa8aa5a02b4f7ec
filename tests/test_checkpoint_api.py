"""Checkpoint upload and download on a real coordinator (checkpoint_api.py), through the real client."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from cis490fleet import bundle, errors
from cis490fleet.client import Client
from conftest import OPERATOR_TOKEN, manifest_toml, signed, wait_for


def client(srv, host: str) -> Client:
    return Client(srv.url, host_id=host, operator_token=OPERATOR_TOKEN, retries=1, backoff_s=0.01)


def checkpoint_bundle(tmp_path, name: str, content: bytes):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(content)
    path, sha, size = bundle.make_bundle(folder, tmp_path / f"{name}-bundle")
    return path, sha, size


def test_checkpoint_goes_to_the_next_attempt_and_completion_prunes_the_older_ones(live_server, tmp_path):
    srv = live_server(manifest_toml(1, heartbeat_s=0.2, stale_after_s=1), sweep_interval=0.1)
    one, two = client(srv, "ws1"), client(srv, "ws2")
    first = one.claim({})
    assert first["resume"] is None
    job_id, lease = first["job_id"], first["lease"]
    path_a, sha_a, size_a = checkpoint_bundle(tmp_path, "a", b"epoch 1")
    answer = one.upload_checkpoint(job_id, lease, path_a, sha256=sha_a, epoch=1)
    assert answer == {"sha256": sha_a, "attempt": 1, "epoch": 1, "size": size_a, "deduplicated": False}
    stored = srv.coordinator.checkpoints.locate(sha_a)
    assert stored is not None and stored.read_bytes() == path_a.read_bytes()

    with pytest.raises(errors.StaleLease):  # another host cannot hand in a checkpoint for this job
        two.upload_checkpoint(job_id, "not-the-lease", path_a, sha256=sha_a, epoch=1)

    # ws1 goes silent: the job goes stale and ws2's claim is told where to resume from.
    def claimed():
        answer = two.claim({})
        return answer if answer.get("job") else None

    second = wait_for("the stale job claimed by ws2", claimed, timeout=30, every=0.2)
    assert second["job_id"] == job_id and second["attempt"] == 2
    assert second["resume"]["sha256"] == sha_a and second["resume"]["epoch"] == 1
    got = two.download_checkpoint(sha_a, tmp_path / "got.tar")
    assert hashlib.sha256(got.read_bytes()).hexdigest() == sha_a

    path_b, sha_b, _ = checkpoint_bundle(tmp_path, "b", b"epoch 2")
    two.upload_checkpoint(job_id, second["lease"], path_b, sha256=sha_b, epoch=2)
    detail = one.job(job_id)["job"]
    assert [(c["attempt"], c["epoch"], c["sha256"]) for c in detail["checkpoints"]] == [(1, 1, sha_a), (2, 2, sha_b)]

    art = tmp_path / "out"
    art.mkdir()
    (art / "model.pt").write_bytes(b"weights")
    model, sha_m, _ = bundle.make_bundle(art, tmp_path / "model")
    two.upload(job_id, second["lease"], model, sha256=sha_m)
    two.complete(job_id, second["lease"], sha_m)
    detail = one.job(job_id)["job"]
    assert [c["sha256"] for c in detail["checkpoints"]] == [sha_b]
    # Removed after the commit, by the writer (the answer may go out first).
    wait_for("the pruned checkpoint's file to go", lambda: srv.coordinator.checkpoints.locate(sha_a) is None,
             timeout=10, every=0.02)
    assert srv.coordinator.checkpoints.locate(sha_b) is not None
    with pytest.raises(errors.NotFound, match="pruned when its job completed"):
        one.download_checkpoint(sha_a, tmp_path / "gone.tar")


def test_a_checkpoint_that_does_not_match_its_sha256_is_refused_and_nothing_is_kept(live_server, tmp_path):
    srv = live_server(manifest_toml(1))
    one = client(srv, "ws1")
    claim = one.claim({})
    path, sha, _ = checkpoint_bundle(tmp_path, "a", b"epoch 1")
    wrong = "f" * 64
    with pytest.raises(errors.IntegrityError, match="does not match"):
        one.upload_checkpoint(claim["job_id"], claim["lease"], path, sha256=wrong, epoch=1)
    assert one.job(claim["job_id"])["job"]["checkpoints"] == []
    assert srv.coordinator.checkpoints.locate(wrong) is None


@pytest.mark.parametrize("headers,status,words", [
    ({"x-checkpoint-epoch": "-3"}, 400, "x-checkpoint-epoch must be a whole number"),
    ({"x-content-sha256": ""}, 400, "missing x-content-sha256"),
])
def test_bad_checkpoint_headers_are_named(live_server, headers, status, words):
    srv = live_server(manifest_toml(1))
    claim = srv.call("POST", "/v1/job/claim", {"capability": {}}, {"x-lab-host": "ws1"})[2]
    base = {"x-lab-host": "ws1", "x-lease": claim["lease"], "x-content-sha256": "a" * 64}
    got, _, body = srv.call("PUT", f"/v1/job/{claim['job_id']}/checkpoint", b"x", {**base, **headers})
    assert got == status and words in body["detail"], body


def test_a_checkpoint_whose_job_changed_hands_while_it_was_sent_is_refused_and_not_kept(live_server, tmp_path):
    import socket
    import urllib.parse

    srv = live_server(manifest_toml(1))
    one = client(srv, "ws1")
    claim = one.claim({})
    data = os.urandom(100_000)
    sha = hashlib.sha256(data).hexdigest()
    url = urllib.parse.urlsplit(srv.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    try:
        path = f"/v1/job/{claim['job_id']}/checkpoint"
        _, headers = signed(srv.host_key("ws1"), "ws1", "PUT", path, None,
                            {"x-lab-host": "ws1", "x-lease": claim["lease"], "x-content-sha256": sha})
        head = (f"PUT {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + f"content-length: {len(data)}\r\n\r\n")
        sock.sendall(head.encode() + data[:1000])  # the holder check passes, the body is on its way
        time.sleep(0.5)
        one.cancel(claim["job_id"])
        one.requeue(claim["job_id"])
        assert client(srv, "ws2").claim({})["job_id"] == claim["job_id"]  # another host holds it now
        sock.sendall(data[1000:])
        answer = sock.recv(65536).decode(errors="replace")
    finally:
        sock.close()
    assert answer.startswith("HTTP/1.1 409"), answer
    assert srv.coordinator.checkpoints.locate(sha) is None, "a checkpoint nobody refers to stayed on disk"
