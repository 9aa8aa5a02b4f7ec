"""The OpenAPI 3.1 document of the coordinator's wire API (served at GET /v1/openapi.json).

Adapter layer, data only: a function returning a dict. tests/test_http_api.py
checks that every route in ``http_api``'s table appears here with its method,
and that nothing here is missing from the table.
"""

from __future__ import annotations

from cis490fleet import __version__
from cis490fleet.jobs import FAILURE_CLASSES

_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    text = {
        400: "malformed request: the detail names the field and what was expected",
        401: "identity or operator token missing",
        403: "wrong operator token, operator actions disabled, or TLS identity mismatch",
        404: "no such job, artifact or route",
        405: "the path exists but not for this method",
        409: "the caller no longer holds the job (stale lease) or its status forbids the action",
        411: "content-length is required",
        413: "body too large",
        503: "busy, shutting down, or not the leader",
        507: "the coordinator's disk is full: nothing stored was lost; free space there, then retry",
    }
    return {str(s): _json(_ref("Error"), text[s]) for s in statuses}


_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "a job id (64 hex digits); operator endpoints and GET also take a unique prefix of 4+ hex "
                            "digits or the job's manifest name (an ambiguous one is a 400 listing its jobs)"}
_JOB_ID_PARAM = {"name": "job_id", "in": "path", "required": True, "schema": _HEX64}
_HOST_PARAM = {"name": "host", "in": "path", "required": True, "schema": {"type": "string"}}
_SHA_PARAM = {"name": "sha256", "in": "path", "required": True, "schema": _HEX64}
_HOST_HEADER = {"name": "x-lab-host", "in": "header", "required": False, "schema": {"type": "string"},
                "description": "the worker's host id; required unless a TLS client certificate names it"}
_LEASE_HEADER = {"name": "x-lease", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "the lease from the claim; required unless serve --trust-host-header"}
_SESSION = [{"$ref": "#/components/parameters/clientId"}, {"$ref": "#/components/parameters/clientSerial"}]
PARAMETERS = {
    "clientId": {"name": "x-client-id", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,64}$"},
                 "description": "the client's session id (random, one per client); with x-client-serial, a retried "
                                "write applies once and answers as the first time"},
    "clientSerial": {"name": "x-client-serial", "in": "header", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                     "description": "the write's number in the client's session, increasing; a retry sends the "
                                    "same one, an older one is refused (400)"},
}
_WORKER = [{"hostSignature": []}, {"mutualTLS": []}, {"labHost": []}]
_OPERATOR = [{"operatorToken": []}]


def _body(schema: dict, required: bool = True) -> dict:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _worker_op(summary: str, body: dict | None, ok: dict, *errors: int) -> dict:
    op = {"summary": summary, "security": _WORKER, "parameters": [_ID_PARAM, _HOST_HEADER, _LEASE_HEADER, *_SESSION],
          "responses": {"200": _json(ok), **_errors(400, 401, 403, 404, 409, *errors)}}
    if body is not None:
        op["requestBody"] = body
    return op


def _operator_op(summary: str, ok: dict, params: list | None = None, body: dict | None = None) -> dict:
    op = {"summary": summary, "security": _OPERATOR, "parameters": [*(params or []), *_SESSION],
          "responses": {"200": _json(ok), **_errors(400, 401, 403, 404, 409)}}
    if body is not None:
        op["requestBody"] = body
    return op


_OK = {"type": "object", "required": ["ok"], "properties": {"ok": {"const": True}}}
_PEER = {"type": "object", "required": ["id", "url"],
         "properties": {"id": {"type": "string"}, "url": {"type": "string", "format": "uri"}}}
_PEER_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                  "description": "the peer's id in the group"}
_MEMBERSHIP = {"type": "object", "required": ["ok", "index", "voters", "learners"],
               "properties": {"ok": {"const": True}, "index": {"type": "integer", "description": "the change's log index"},
                              "voters": {"type": "array", "items": {"type": "string"}},
                              "learners": {"type": "array", "items": {"type": "string"}}}}

SCHEMAS = {
    "HostKey": {"type": "object", "required": ["host", "key"],
                "properties": {"host": {"type": "string"}, "key": _HEX64,
                               "enroll": {"type": "object", "properties": {"linux": {"type": "string"},
                                                                           "windows": {"type": "string"}}}}},
    "Error": {"type": "object", "required": ["error", "detail"],
              "properties": {"error": {"type": "string", "description": "short code, e.g. stale_lease"},
                             "detail": {"type": "string", "description": "a sentence a person can act on"}}},
    "Capability": {"type": "object", "additionalProperties": True,
                   "properties": {"host": {"type": ["string", "null"]}, "os": {"type": ["string", "null"]},
                                  "python": {"type": ["string", "null"]}, "cores": {"type": "integer"},
                                  "ram_gib": {"type": "number"}, "cuda": {"type": "boolean"},
                                  "gpus": {"type": "array", "items": {"type": "object"}},
                                  "vram_gib": {"type": "number"}, "torch": {"type": ["string", "null"]},
                                  "git_commit": {"type": ["string", "null"]}, "disk_free_gib": {"type": "number"},
                                  "slots": {"type": "integer", "minimum": 1}}},
    "JobSpec": {"type": "object", "additionalProperties": True,
                "properties": {"id": _HEX64, "model": {"type": "string"}, "mode": {"type": "string"},
                               "hyper": {"type": "object"}, "split_recipe": {"type": "string"},
                               "train_hosts": {"type": "array", "items": {"type": "string"}},
                               "seed": {"type": "integer"}}},
    "Job": {"type": "object", "additionalProperties": True,
            "properties": {"id": _HEX64, "status": {"enum": ["pending", "claimed", "running", "completed",
                                                               "failed", "cancelled"]},
                           "model": {"type": "string"}, "mode": {"type": "string"},
                           "host": {"type": ["string", "null"]}, "attempt": {"type": "integer"},
                           "artifact_id": {"type": ["string", "null"]},
                           "started": {"type": ["number", "null"],
                                       "description": "when the current attempt began (seconds since the epoch); "
                                                      "null when no attempt holds the job"},
                           "checkpoints": {"type": "array", "items": _ref("Checkpoint"),
                                           "description": "job detail only: the checkpoint each attempt left"}}},
    "Claim": {"type": "object", "required": ["job"],
              "properties": {"job": {"oneOf": [{"type": "null"}, _ref("JobSpec")]}, "job_id": _HEX64,
                             "lease": {"type": ["string", "integer"]}, "attempt": {"type": "integer"},
                             "heartbeat_s": {"type": "number"}, "stale_after_s": {"type": "number"},
                             "trainer": {"type": "object"},
                             "gpus": {"type": "array", "items": {"type": "integer"},
                                      "description": "with a slot in the claim: the GPUs the job may use"},
                             "slot": {"type": "integer"},
                             "slots": {"type": "integer", "description": "the host's slots as the coordinator "
                                                                         "sees them"},
                             "checkpoint_every_s": {"type": "number",
                                                    "description": "upload a changed checkpoint at most this often"},
                             "resume": {"oneOf": [{"type": "null"}, _ref("Checkpoint")],
                                        "description": "the newest checkpoint of an earlier attempt: download it "
                                                       "from /v1/checkpoint/{sha256} and resume from it"},
                             "max_runtime_s": {"type": ["number", "null"],
                                               "description": "stop the attempt past this (null: no limit)"},
                             "stall_after_s": {"type": ["number", "null"],
                                               "description": "stop the attempt after this long without a progress "
                                                              "line (null: never)"}}},
    "Checkpoint": {"type": "object", "required": ["attempt", "sha256", "epoch", "size", "host", "created"],
                   "properties": {"attempt": {"type": "integer"}, "sha256": _HEX64,
                                  "epoch": {"type": ["integer", "null"]}, "size": {"type": "integer"},
                                  "host": {"type": "string"}, "created": {"type": "number"}}},
    "Failure": {"type": "object",
                "required": ["job_id", "name", "model", "mode", "attempt", "host", "ended", "outcome", "error",
                             "status"],
                "properties": {"job_id": _HEX64, "name": {"type": ["string", "null"]}, "model": {"type": "string"},
                               "mode": {"type": "string"},
                               "attempt": {"type": "integer", "description": "the attempt record's number"},
                               "host": {"type": "string"}, "ended": {"type": "number"},
                               "outcome": {"enum": ["failed", "stale"],
                                           "description": "stale: the holder stopped heartbeating"},
                               "error": {"type": ["string", "null"]},
                               "status": {"type": "string",
                                          "description": "the job's status now: pending while it is retried, "
                                                         "completed when a later attempt succeeded"},
                               "class": {"type": ["string", "null"],
                                         "description": "why the attempt ended: a failure class, or lost "
                                                        "(the stale sweep)"}}},
    "Progress": {"type": "object", "properties": {"progress": {"type": "object"}, "log_tail": {"type": "string"}}},
}

PATHS = {
    "/": {"get": {"summary": "the dashboard page", "responses": {
        "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
        "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    "/v1/health": {"get": {"summary": "liveness, role and queue counts", "responses": {"200": _json({
        "type": "object", "required": ["ok", "role", "leader", "term", "node_id", "version", "jobs"],
        "properties": {"ok": {"type": "boolean"}, "role": {"enum": ["leader", "follower", "candidate"]},
                       "leader": {"type": ["string", "null"]}, "term": {"type": "integer"},
                       "node_id": {"type": "string"}, "version": {"type": "string"},
                       "jobs": {"type": "object", "additionalProperties": {"type": "integer"}},
                       "url": {"type": ["string", "null"]},
                       "security": {"type": "object", "properties": {"workers": {"type": "string"},
                                                                     "reads": {"enum": ["open", "token"]}}},
                       "manifest": {"type": ["object", "null"]}, "apply_failures": {"type": "integer"},
                       "access": {"enum": ["operator", "reader", "none"],
                                  "description": "what the token the caller sent allows"},
                       "peers": {"type": "array"},
                       **{k: {"type": "integer", "description": f"replicated group only: {what}"} for k, what in (
                           ("commit", "the Raft commit index"), ("commit_index", "the same"),
                           ("applied", "the last log index the queue holds"),
                           ("last_index", "this peer's last log index"),
                           ("snapshot_index", "the index of this peer's newest snapshot"),
                           ("artifacts_missing", "recorded bundles this peer has yet to fetch from a peer"))},
                       "installing": {"type": ["integer", "null"],
                                      "description": "replicated group only: the index of a snapshot whose queue "
                                                     "this peer is downloading"},
                       "leader_url": {"type": ["string", "null"]}, "cluster": {"type": ["string", "null"]},
                       "voters": {"type": "array", "items": {"type": "string"}},
                       "learners": {"type": "array", "items": {"type": "string"}},
                       "member": {"enum": ["voter", "learner", None]},
                       "lost": {"type": ["string", "null"]}}})}}},
    "/v1/openapi.json": {"get": {"summary": "this document", "responses": {"200": _json({"type": "object"})}}},
    "/v1/job/claim": {"post": {
        "summary": "claim one eligible job, optionally waiting up to `wait` seconds for one",
        "security": _WORKER, "parameters": [_HOST_HEADER, *_SESSION],
        "requestBody": _body({"type": "object", "properties": {
            "capability": _ref("Capability"), "wait": {"type": "number", "minimum": 0, "maximum": 60},
            "slot": {"type": "object", "description": "the claiming slot and its GPUs (with their free VRAM); "
                     "the answer's `gpus` are the GPUs the job may use",
                     "required": ["index"], "properties": {
                         "index": {"type": "integer", "minimum": 0},
                         "gpus": {"type": "array", "items": {"type": "object", "required": ["index"], "properties": {
                             "index": {"type": "integer", "minimum": 0},
                             "free_vram_gib": {"type": "number", "minimum": 0}}}}}}}}, False),
        "responses": {"200": _json(_ref("Claim")), **_errors(400, 401, 403, 413, 503)}}},
    "/v1/job/{id}/heartbeat": {"post": _worker_op(
        "report progress; the answer says whether to cancel",
        _body({"oneOf": [_ref("Progress"), {"type": "array", "items": _ref("Progress")}]}, False),
        {"type": "object", "required": ["ok", "cancel"],
         "properties": {"ok": {"const": True}, "cancel": {"type": "boolean"},
                        "stopped": {"type": "string", "description": "why the sweep's stop rule ended the job "
                                                                     "(then cancel is true)"}}})},
    "/v1/job/{id}/complete": {"post": _worker_op(
        "finish the job with an uploaded artifact",
        _body({"type": "object", "required": ["artifact_id"], "properties": {
            "artifact_id": _HEX64,
            "metrics": {"type": "object", "description": "the final metrics (the trainer's metrics.json); its finite "
                        "numbers are kept, else those of the last progress report",
                        "additionalProperties": {"type": "number"}},
            "progress": {"type": "object", "description": "the trainer's last progress line: the job's progress "
                         "and the last point of its curve"}}}), _OK)},
    "/v1/job/{id}/fail": {"post": _worker_op(
        "report that this attempt failed; whether the job is retried depends on the failure's class",
        _body({"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string"},
            "class": {"enum": sorted(FAILURE_CLASSES),
                      "description": "whose fault: job, usage (exit 2, never retried), time_limit and stalled "
                                     "are the job's (retried only as `retries` grants); signal, fenced and infra "
                                     "are not (retried up to max_attempts). Absent: job"}}}),
        {"type": "object", "required": ["ok", "status"],
         "properties": {"ok": {"const": True}, "status": {"type": "string"},
                        "retry_at": {"type": ["number", "null"]}}})},
    "/v1/job/{id}/release": {"post": _worker_op("give the job back (worker shutting down)", None, _OK)},
    "/v1/job/{id}/watch": {"post": _worker_op(
        "long-poll: answers as soon as the job is cancelled, else after `wait` seconds; 409 once the caller no "
        "longer holds the job",
        _body({"type": "object", "properties": {"wait": {"type": "number", "minimum": 0}}}),
        {"type": "object", "required": ["cancel"], "properties": {"cancel": {"type": "boolean"}}})},
    "/v1/job/{id}/cancel": {"post": _operator_op("cancel the job; a running worker is told by its heartbeat", _OK,
                                                 [_ID_PARAM])},
    "/v1/job/{id}/requeue": {"post": _operator_op(
        "put a failed or cancelled job back in the queue with every try available again (409 for a completed, "
        "running or claimed job)", _OK,
                                                  [_ID_PARAM])},
    "/v1/job/{id}": {"get": {"summary": "job detail with attempt history and log tail", "parameters": [_ID_PARAM],
                             "responses": {"200": _json({"type": "object", "required": ["job"],
                                                         "properties": {"job": _ref("Job")}}),
                                           **_errors(400, 404)}}},
    "/v1/jobs": {"post": _operator_op(
        "add jobs without editing the manifest: [[jobs]] and [[sweeps]] tables, checked with the manifest in force",
        {"type": "object", "required": ["added", "jobs"], "properties": {
            "dry_run": {"type": "boolean"}, "added": {"type": "integer"}, "existing": {"type": "integer"},
            "jobs": {"type": "array", "items": {"type": "object"}}}},
        body=_body({"type": "object", "required": ["toml"], "properties": {
            "toml": {"type": "string", "description": "TOML with [[jobs]] and [[sweeps]] tables only"},
            "dry_run": {"type": "boolean", "description": "answer the jobs it would add, add nothing"}}})),
                 "get": {"summary": "list jobs", "parameters": [
        {"name": "status", "in": "query", "schema": {"type": "string"}},
        {"name": "model", "in": "query", "schema": {"type": "string"}},
        {"name": "host", "in": "query", "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}],
        "responses": {"200": _json({"type": "object", "required": ["jobs", "total"], "properties": {
            "jobs": {"type": "array", "items": _ref("Job")}, "total": {"type": "integer"}}}), **_errors(400)}}},
    "/v1/workers": {"get": {"summary": "known workers and when they were last seen", "responses": {
        "200": _json({"type": "object", "required": ["workers"],
                      "properties": {"workers": {"type": "array", "items": {"type": "object"}}}})}}},
    "/v1/failures": {"get": {
        "summary": "the newest failed or stale attempts of any job, newest first, with the job's current status",
        "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                                  "default": 20}}],
        "responses": {"200": _json({"type": "object", "required": ["failures"], "properties": {
            "failures": {"type": "array", "items": _ref("Failure")}}}), **_errors(400)}}},
    "/v1/job/{id}/metrics": {"get": {
        "summary": "the numbers of every progress report of the job, per attempt (downsampled past 512 points)",
        "parameters": [_ID_PARAM],
        "responses": {"200": _json({"type": "object", "required": ["job_id", "attempts"], "properties": {
            "job_id": _HEX64,
            "attempts": {"type": "array", "items": {"type": "object", "properties": {
                "attempt": {"type": "integer"},
                "points": {"type": "array", "items": {"type": "object", "properties": {
                    "t": {"type": "number"}, "epoch": {"type": ["number", "null"]},
                    "step": {"type": ["integer", "null"]},
                    "metrics": {"type": "object", "additionalProperties": {"type": "number"}}}}}}}}}}),
            **_errors(400, 404)}}},
    "/v1/results": {"get": {
        "summary": "completed jobs with their hyper values and final metrics, best first by one metric",
        "parameters": [{"name": n, "in": "query", "schema": {"type": "string"}, "description": d} for n, d in (
            ("sweep", "only this [[sweeps]] entry's jobs (its name, else sweeps[<index>])"),
            ("model", "only this model's jobs"),
            ("sort", "the metric to rank by; default val_loss, else a val_ metric, else a loss"),
            ("order", "min or max: which way is better; default from the metric's name (loss, error: min)"),
            ("format", "json (default) or csv"))],
        "responses": {"200": {"description": "the ranked table", "content": {
            "application/json": {"schema": {"type": "object", "required": ["results", "metrics", "sort"],
                                             "properties": {"results": {"type": "array", "items": {"type": "object"}},
                                                            "metrics": {"type": "array",
                                                                        "items": {"type": "string"}},
                                                            "sort": {"type": ["string", "null"]},
                                                            "order": {"type": ["string", "null"]}}}},
            "text/csv": {"schema": {"type": "string"}}}}, **_errors(400)}}},
    "/v1/worker/register": {"post": {
        "summary": "announce a worker and its capability", "security": _WORKER,
        "parameters": [_HOST_HEADER, *_SESSION],
        "requestBody": _body({"type": "object", "required": ["capability"],
                              "properties": {"capability": _ref("Capability")}}),
        "responses": {"200": _json({"type": "object", "required": ["ok"], "properties": {
            "ok": {"const": True},
            "slots": {"type": "array", "description": "the slots the worker runs: the manifest's [[hosts]] slots, "
                      "else its own count; each with its GPUs",
                      "items": {"type": "object", "properties": {
                          "index": {"type": "integer"}, "gpus": {"type": "array", "items": {"type": "integer"}}}}}}}),
            **_errors(400, 401, 403, 413)}}},
    "/v1/worker/leave": {"post": {
        "summary": "a stopping worker says it is leaving: /v1/workers shows it gone (live false, left set) at once, "
                   "not after worker_timeout_s; its next request brings it back",
        "security": _WORKER, "parameters": [_HOST_HEADER, *_SESSION],
        "responses": {"200": _json({"type": "object", "required": ["ok"], "properties": {"ok": {"const": True}}}),
                      **_errors(400, 401, 403)}}},
    "/v1/model/{job_id}": {"put": {
        "summary": "upload the job's model bundle (streamed, verified, content-addressed)", "security": _WORKER,
        "parameters": [_JOB_ID_PARAM, _HOST_HEADER, _LEASE_HEADER,
                       {"name": "x-content-sha256", "in": "header", "required": True, "schema": _HEX64},
                       {"name": "content-length", "in": "header", "required": True,
                        "schema": {"type": "integer", "minimum": 0}}],
        "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
        "responses": {"201": _json({"type": "object", "required": ["artifact_id", "path", "deduplicated"],
                                    "properties": {"artifact_id": _HEX64, "path": {"type": "string"},
                                                   "deduplicated": {"type": "boolean"}}}, "stored"),
                      **_errors(400, 401, 403, 404, 409, 411, 413, 507)}}},
    "/v1/artifact/{sha256}": {"get": {
        "summary": "download a model bundle", "parameters": [_SHA_PARAM],
        "responses": {"200": {"description": "the bundle; header x-content-sha256 repeats the id",
                              "content": {"application/octet-stream": {"schema": {
                                  "type": "string", "contentMediaType": "application/octet-stream"}}}},
                      **_errors(400, 404)}}},
    "/v1/job/{job_id}/checkpoint": {"put": {
        "summary": "upload the newest checkpoint of the caller's attempt (fenced by the lease; streamed, verified, "
                   "content-addressed; a cancelled job's holder may still hand one in)", "security": _WORKER,
        "parameters": [_JOB_ID_PARAM, _HOST_HEADER, _LEASE_HEADER,
                       {"name": "x-content-sha256", "in": "header", "required": True, "schema": _HEX64},
                       {"name": "x-checkpoint-epoch", "in": "header", "required": False,
                        "schema": {"type": "integer", "minimum": 0}, "description": "epochs done at the checkpoint"},
                       {"name": "content-length", "in": "header", "required": True,
                        "schema": {"type": "integer", "minimum": 0}}],
        "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
        "responses": {"201": _json({"type": "object", "required": ["sha256", "attempt", "epoch", "size",
                                                                   "deduplicated"],
                                    "properties": {"sha256": _HEX64, "attempt": {"type": "integer"},
                                                   "epoch": {"type": ["integer", "null"]},
                                                   "size": {"type": "integer"},
                                                   "deduplicated": {"type": "boolean"}}}, "stored and recorded"),
                      **_errors(400, 401, 403, 404, 409, 411, 413)}}},
    "/v1/checkpoint/{sha256}": {"get": {
        "summary": "download a checkpoint (a bundle of the trainer's checkpoint folder)", "parameters": [_SHA_PARAM],
        "responses": {"200": {"description": "the checkpoint bundle; header x-content-sha256 repeats the id",
                              "content": {"application/octet-stream": {"schema": {
                                  "type": "string", "contentMediaType": "application/octet-stream"}}}},
                      **_errors(400, 404)}}},
    "/v1/job/{job_id}/log": {"put": {
        "summary": "hand in the caller's attempt's whole train.log, gzip-compressed (head and tail past 8 MiB, a "
                   "marker between), when the attempt ends; fenced by the lease like a checkpoint",
        "security": _WORKER,
        "parameters": [_JOB_ID_PARAM, _HOST_HEADER, _LEASE_HEADER,
                       {"name": "x-content-sha256", "in": "header", "required": True, "schema": _HEX64},
                       {"name": "content-length", "in": "header", "required": True,
                        "schema": {"type": "integer", "minimum": 0}}],
        "requestBody": {"required": True, "content": {"application/gzip": {
            "schema": {"type": "string", "contentMediaType": "application/gzip"}}}},
        "responses": {"201": _json({"type": "object", "required": ["sha256", "attempt", "size"],
                                    "properties": {"sha256": _HEX64, "attempt": {"type": "integer"},
                                                   "size": {"type": "integer"}}}, "stored and recorded"),
                      **_errors(400, 401, 403, 404, 409, 411, 413)}}},
    "/v1/job/{id}/log": {"get": {
        "summary": "an attempt's whole log as text (content-encoding: gzip); header x-attempt names the attempt",
        "parameters": [_ID_PARAM, {"name": "attempt", "in": "query", "required": False,
                                   "schema": {"type": "integer", "minimum": 1},
                                   "description": "default: the newest attempt that handed in a log"}],
        "responses": {"200": {"description": "the log", "content": {"text/plain": {"schema": {"type": "string"}}}},
                      **_errors(400, 404)}}},
    "/v1/log/{sha256}": {"get": {
        "summary": "a stored log by content, gzip (peers copy what they lack)", "parameters": [_SHA_PARAM],
        "responses": {"200": {"description": "the gzip file; header x-content-sha256 repeats the id",
                              "content": {"application/gzip": {"schema": {
                                  "type": "string", "contentMediaType": "application/gzip"}}}},
                      **_errors(400, 404)}}},
    "/v1/zipapp": {"get": {
        "summary": "this coordinator's cis490fleet.pyz, for copy-one-file enrollment",
        "responses": {"200": {"description": "the zipapp; header x-content-sha256 is its sha256",
                              "content": {"application/zip": {"schema": {
                                  "type": "string", "contentMediaType": "application/zip"}}}}}}},
    "/v1/install-worker.ps1": {"get": {
        "summary": "the Windows worker installer of this build, for the pinned one-liner `jobs hosts add` prints",
        "responses": {"200": {"description": "the PowerShell script; header x-content-sha256 is its sha256",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    "/v1/manifest/reload": {"post": _operator_op(
        "put a manifest in force (the text sent, else the receiving peer's --manifest file) and sync the queue "
        "(idempotent); the group keeps its text and sha256",
        {"type": "object", "required": ["added", "kept", "removed", "total"],
         "properties": {**{k: {"type": "integer"} for k in ("added", "kept", "removed", "total", "out_of_tries")},
                        "manifest": {"type": "object", "properties": {
                            "sha256": {"type": "string"}, "name": {"type": "string"},
                            "applied": {"type": "number"}}}}},
        body=_body({"type": "object", "properties": {"text": {"type": "string"}, "name": {"type": "string"}}},
                   required=False))},
    "/v1/peers": {"post": _operator_op(
        "add a peer to the replicated group: it joins as a learner and becomes a voter once caught up (answers "
        "when the change is committed)", _MEMBERSHIP, body=_body(_PEER))},
    "/v1/peers/replace": {"post": _operator_op(
        "replace a peer: add the new one as a learner, remove the old one once the new one is a voter",
        _MEMBERSHIP, body=_body({**_PEER, "required": ["old", "id", "url"],
                                 "properties": {**_PEER["properties"], "old": {"type": "string"}}}))},
    "/v1/peers/{id}": {"delete": _operator_op("remove a peer from the replicated group", _MEMBERSHIP,
                                              [_PEER_ID_PARAM])},
    "/v1/peers/{id}/remove": {"post": _operator_op("remove a peer from the replicated group (as DELETE)",
                                                   _MEMBERSHIP, [_PEER_ID_PARAM])},
    "/v1/hosts": {
        "get": {"summary": "hosts with a key (never the key: when, by whom, revoked) and [[hosts]] without one",
                "security": _OPERATOR,
                "responses": {"200": _json({"type": "object", "required": ["hosts"],
                                            "properties": {"hosts": {"type": "array", "items": {"type": "object"}}}}),
                              **_errors(401, 403)}},
        "post": {"summary": "give a host a key: answered this once, with the enroll commands for Linux and Windows",
                 "security": _OPERATOR,
                 "requestBody": _body({"type": "object", "required": ["host"],
                                       "properties": {"host": {"type": "string"}}}),
                 "responses": {"201": _json(_ref("HostKey"), "the key (64 hex digits); store it, it is not "
                                                             "shown again"), **_errors(400, 401, 403)}}},
    "/v1/hosts/{host}/rotate": {"post": {
        "summary": "replace a host's key (the old one stops working at once); answered this once",
        "security": _OPERATOR, "parameters": [_HOST_PARAM],
        "responses": {"200": _json(_ref("HostKey")), **_errors(400, 401, 403, 404)}}},
    "/v1/hosts/{host}/revoke": {"post": {
        "summary": "revoke a host's key: its signed requests are refused from now on",
        "security": _OPERATOR, "parameters": [_HOST_PARAM],
        "responses": {"200": _json(_OK), **_errors(400, 401, 403, 404)}}},
    "/v1/raft/messages": {"post": {
        "summary": "peer to peer: a batch of Raft messages (replicated groups only)",
        "requestBody": _body({"type": "object", "required": ["cluster", "from", "to", "messages"],
                              "properties": {"cluster": {"type": "string"}, "from": {"type": "string"},
                                             "to": {"type": "string"},
                                             "messages": {"type": "array", "items": {"type": "object"}}}}),
        "responses": {"200": _json(_OK), **_errors(400, 403, 404, 413)}}},
    "/v1/raft/snapshot": {"get": {
        "summary": "peer to peer: a consistent copy of the queue database, for a follower's InstallSnapshot",
        "parameters": [{"name": "x-raft-cluster", "in": "header", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the SQLite database", "content": {"application/octet-stream": {
            "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
            **_errors(403, 404)}}},
    "/v1/raft/artifact/{sha256}": {"put": {
        "summary": "peer to peer: the leader pushes a stored bundle before recording it (verified by sha256)",
        "parameters": [_SHA_PARAM,
                       {"name": "x-raft-cluster", "in": "header", "required": True, "schema": {"type": "string"}},
                       {"name": "x-artifact", "in": "header", "required": True, "schema": {"type": "string"},
                        "description": "JSON: model, mode, job_id, host, now"}],
        "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
        "responses": {"201": _json({"type": "object"}, "stored"), **_errors(400, 403, 404, 411, 413)}}},
}


def document() -> dict:
    """A fresh copy of the OpenAPI document."""
    import copy

    return {
        "openapi": "3.1.0",
        "info": {"title": "cis490fleet coordinator", "version": __version__,
                 "description": "Coordinates training jobs across a lab fleet; every job is trained at most once. "
                                "Every error body is {\"error\": code, \"detail\": sentence}."},
        "paths": copy.deepcopy(PATHS),
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "parameters": copy.deepcopy(PARAMETERS),
            "securitySchemes": {
                "labHost": {"type": "apiKey", "in": "header", "name": "x-lab-host",
                            "description": "legacy mode only (serve --trust-host-header)"},
                "hostSignature": {"type": "apiKey", "in": "header", "name": "x-fleet-signature",
                                  "description": "HMAC-SHA256 with the host key over method, target, x-fleet-time, "
                                                 "x-fleet-nonce, the body's sha256 and the fencing headers; "
                                                 "x-fleet-signer names host/<host id>; x-fleet-time at most 300 s "
                                                 "behind and 5 s ahead of the coordinator's Date. A POST without "
                                                 "x-client-id/x-client-serial signed before a restart or a change of "
                                                 "leader is 401 stale_signature with x-fleet-not-before (also "
                                                 "not_before in the body): sign it again from then on"},
                "readToken": {"type": "apiKey", "in": "header", "name": "x-read-token"},
                "operatorToken": {"type": "apiKey", "in": "header", "name": "x-operator-token"},
                "mutualTLS": {"type": "mutualTLS"},
            },
        },
    }
