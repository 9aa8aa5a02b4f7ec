"""Checkpoints on the coordinator: their upload and download routes, their files, their copies on peers.

Registered through ``http_api.EXTENSIONS``. An upload is fenced like a model
bundle's (the holder, with its lease, checked before a byte is read), streamed,
verified and stored content-addressed under ``<data>/checkpoints/`` (duplicates
are one file); with peers, it reaches a majority of them before
``record_checkpoint`` commits, so the next attempt finds it whichever peer leads.
A checkpoint file is deleted only when a queue command answers that nothing
refers to it any more (``Coordinator._after_commit``).
"""

from __future__ import annotations

import time

from cis490fleet import errors
from cis490fleet.http_api import Request, Response, declared_upload, job_id_param, json_response, sha_param

UPLOAD = "/v1/job/{job_id}/checkpoint"
DOWNLOAD = "/v1/checkpoint/{sha256}"
KIND = "checkpoint"  # the ``kind`` of a checkpoint in a peer copy's metadata (replication.py)


def register(router) -> None:
    router.add("PUT", UPLOAD, h_upload_checkpoint)
    router.add("GET", DOWNLOAD, h_checkpoint)


def epoch_header(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 15:
        raise errors.BadRequest(f"x-checkpoint-epoch must be a whole number of epochs >= 0; got {value[:40]!r}")
    return int(value)


def h_upload_checkpoint(req: Request):
    job_id = job_id_param(req.params["job_id"])
    host = req.host_id()
    lease = req.lease()
    epoch = epoch_header(req.header("x-checkpoint-epoch"))
    declared, length = declared_upload(req, "checkpoint")
    result = store_checkpoint(req.app, job_id, host, lease, req, declared, length, epoch)
    return json_response(result, 201)


def store_checkpoint(app, job_id: str, host: str, lease: str | None, body, sha256: str, length: int,
                     epoch: int | None) -> dict:
    """Check the holder, store the bytes, copy them to a majority of peers, then record the checkpoint."""
    job = app._read(app.store.check_checkpoint_holder, job_id, host, lease)
    now = time.time()
    stored = app.checkpoints.put(body, sha256=sha256, length=length, model=job["model"], mode=job["mode"],
                                 job_id=job_id, host=host, now=now)
    if app.replicator is not None:
        app.replicator.push_artifact(sha256, {"kind": KIND, "model": job["model"], "mode": job["mode"],
                                              "job_id": job_id, "host": host, "now": now})
    try:
        answer = app.execute({"op": "record_checkpoint", "job_id": job_id, "host": host, "lease": lease,
                              "sha256": sha256, "epoch": epoch, "size": stored["size"], "model": job["model"],
                              "mode": job["mode"]})
    except errors.FleetError:
        # The job changed hands while the bytes came in: a file this upload placed and nothing refers to
        # goes again. (Identical bytes uploaded for another job at this very moment would lose their file
        # too; that attempt's successor then starts from the beginning, which is safe.)
        if not stored["deduplicated"] and not app._read(app.store.checkpoint_referenced, sha256):
            app.checkpoints.remove(sha256)
        raise
    return {"sha256": sha256, "attempt": answer["attempt"], "epoch": epoch, "size": stored["size"],
            "deduplicated": bool(stored["deduplicated"])}


def h_checkpoint(req: Request):
    req.require_reader()
    sha = sha_param(req.params["sha256"], "checkpoint id")
    try:
        f, size = req.app.checkpoints.open_artifact(sha)
    except errors.NotFound:
        raise errors.NotFound(f"checkpoint {sha[:12]} is not stored here (pruned when its job completed, or "
                              "never uploaded); the next attempt starts from the beginning") from None
    return Response(status=200, content_type="application/octet-stream", stream=f, length=size,
                    headers={"x-content-sha256": sha})
