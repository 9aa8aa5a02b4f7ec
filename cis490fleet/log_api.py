"""Attempt logs on the coordinator: a worker hands in an attempt's whole train.log; operators read it.

Registered through ``http_api.EXTENSIONS``. An upload (gzip, ``attempt_log.pack``) is fenced
like a checkpoint's: the holder with its lease, while the attempt is held or after a
cancel, checked before a byte is read; stored content-addressed under ``<data>/logs/``
and, with peers, copied to a majority before ``record_log`` commits. ``GET
/v1/job/{id}/log?attempt=N`` answers the text gzip-encoded (``content-encoding: gzip``),
so a browser shows it as it is.
"""

from __future__ import annotations

import time

from cis490fleet import errors
from cis490fleet.http_api import (Request, Response, declared_upload, job_id_param, job_ref_param, json_response,
                                  sha_param)

UPLOAD = "/v1/job/{job_id}/log"
READ = "/v1/job/{id}/log"
COPY = "/v1/log/{sha256}"  # by content, for peers that lack a copy
KIND = "log"  # the ``kind`` of a log in a peer copy's metadata (replication.py)


def register(router) -> None:
    router.add("PUT", UPLOAD, h_upload_log)
    router.add("GET", READ, h_log)
    router.add("GET", COPY, h_log_copy)


def h_upload_log(req: Request):
    job_id = job_id_param(req.params["job_id"])
    host, lease = req.host_id(), req.lease()
    declared, length = declared_upload(req, "log")
    app = req.app
    job = app._read(app.store.check_log_holder, job_id, host, lease)
    now = time.time()
    stored = app.logs.put(req, sha256=declared, length=length, model=job["model"], mode=job["mode"], job_id=job_id,
                          host=host, now=now)
    if app.replicator is not None:
        app.replicator.push_artifact(declared, {"kind": KIND, "model": job["model"], "mode": job["mode"],
                                                "job_id": job_id, "host": host, "now": now})
    answer = app.execute({"op": "record_log", "job_id": job_id, "host": host, "lease": lease, "sha256": declared,
                          "size": stored["size"], "model": job["model"], "mode": job["mode"]})
    return json_response({"sha256": declared, "attempt": answer["attempt"], "size": stored["size"]}, 201)


def h_log(req: Request):
    req.require_reader()
    app = req.app
    job_id = app.resolve_job_id(job_ref_param(req.params["id"]))
    attempt = req.query_int("attempt", 0, 0, 1 << 31) or None
    app._barrier()
    found = app._read(app.store.attempt_log, job_id, attempt)
    return _gzip_text(app, found["sha256"], {"x-attempt": str(found["attempt"])})


def h_log_copy(req: Request):
    req.require_reader()
    sha = sha_param(req.params["sha256"], "log id")
    f, size = _open(req.app, sha)
    return Response(status=200, content_type="application/gzip", stream=f, length=size,
                    headers={"x-content-sha256": sha})


def _gzip_text(app, sha: str, headers: dict) -> Response:
    f, size = _open(app, sha)
    return Response(status=200, content_type="text/plain; charset=utf-8", stream=f, length=size,
                    headers={"content-encoding": "gzip", "x-content-sha256": sha, **headers})


def _open(app, sha: str):
    try:
        return app.logs.open_artifact(sha)
    except errors.NotFound:
        raise errors.NotFound(f"log {sha[:12]} is not stored on this peer yet (a copy is on its way); "
                              "retry in a few seconds") from None
