"""Queue commands: the one check every command passes before it is proposed, batched or applied.

Pure core. ``validate(cmd)`` returns the command normalised (defaults filled, the
capability in ``model.normalize_capability`` shape, texts cut to their bounds) or
raises BadRequest naming the op and the field. The coordinator calls it before a
command joins a batch or the Raft log, whichever path it came by (HTTP, a
follower's forward, the sweeper, a reload); ``JobStore`` calls ``parse`` again
when it applies one, so an entry that slipped past (an older peer's log) still
fails the same way on every replica instead of raising in the middle of a batch.

Stored JSON values (a heartbeat's progress, a worker's capability) are bounded
in depth, element count and encoded size, and may hold only finite numbers:
what a replica stores must also serialise on every other one.
"""

from __future__ import annotations

import hashlib
import json
import math

from cis490fleet.errors import BadRequest
from cis490fleet.jobs import CLASS_JOB, FAILURE_CLASSES
from cis490fleet.model import HOST_ID_RE, JOB_ID_RE, OPERATOR_NAME_RE, SHA256_RE, normalize_capability
from cis490fleet.results import final_metrics

LOG_TAIL_MAX = 64 * 1024
ERROR_MAX = 64 * 1024
JSON_DEPTH_MAX = 8
JSON_ITEMS_MAX = 2048
PROGRESS_BYTES_MAX = 64 * 1024
CAPABILITY_BYTES_MAX = 16 * 1024
GPUS_MAX = 64
MANIFEST_BYTES_MAX = 64 << 20


def _bad(op: str, name: str, expected: str, value: object) -> BadRequest:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return BadRequest(f"{op}: field {name!r} must be {expected}; got {shown}")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(op, name, v):
    if not _finite(v):
        raise _bad(op, name, "a finite number (seconds since the epoch)", v)
    return float(v)


def _host(op, name, v):
    if not isinstance(v, str) or not HOST_ID_RE.match(v):
        raise _bad(op, name, "a host id (letters, digits, '.', '_', '-'; at most 63 characters)", v)
    return v


def _lease(op, name, v):
    if not isinstance(v, str) or not v or len(v) > 200:
        raise _bad(op, name, "a non-empty lease string of at most 200 characters", v)
    return v


def _opt_lease(op, name, v):
    return None if v is None else _lease(op, name, v)


def _job_id(op, name, v):
    if not isinstance(v, str) or not JOB_ID_RE.match(v):
        raise _bad(op, name, "a full job id (64 lowercase hex digits); resolve prefixes first", v)
    return v


def _sha(op, name, v):
    if not isinstance(v, str) or not SHA256_RE.match(v):
        raise _bad(op, name, "a sha256 (64 lowercase hex digits)", v)
    return v


def check_json(op: str, name: str, value, *, max_bytes: int, depth: int = JSON_DEPTH_MAX,
               items: int = JSON_ITEMS_MAX) -> None:
    """BadRequest unless ``value`` is plain JSON (objects with string keys, lists, strings, finite numbers,
    booleans, null) nested at most ``depth`` deep, with at most ``items`` values and ``max_bytes`` encoded."""
    count = 0
    stack = [(value, 1, name)]
    while stack:
        v, level, where = stack.pop()
        count += 1
        if count > items:
            raise BadRequest(f"{op}: field {name!r} holds more than {items} values; send less")
        if level > depth:
            raise BadRequest(f"{op}: field {where!r} is nested more than {depth} levels deep; flatten it")
        if isinstance(v, dict):
            for k, sub in v.items():
                if not isinstance(k, str):
                    raise _bad(op, where, "an object with string keys", k)
                stack.append((sub, level + 1, f"{where}.{k}"))
        elif isinstance(v, list):
            stack += [(sub, level + 1, f"{where}[{i}]") for i, sub in enumerate(v)]
        elif isinstance(v, float) and not math.isfinite(v):
            raise _bad(op, where, "a finite number", v)
        elif v is not None and not isinstance(v, (str, int, float, bool)):
            raise _bad(op, where, "plain JSON (numbers, strings, lists, objects)", v)
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    if size > max_bytes:
        raise BadRequest(f"{op}: field {name!r} is {size} bytes as JSON, over the {max_bytes} allowed; send less")


def _json_object(max_bytes: int):
    def check(op, name, v):
        if not isinstance(v, dict):
            raise _bad(op, name, "an object", v)
        check_json(op, name, v, max_bytes=max_bytes)
        return v
    return check


def _opt_progress(op, name, v):
    return None if v is None else _json_object(PROGRESS_BYTES_MAX)(op, name, v)


def _nonneg(op, where, v):
    if v is not None and not (_finite(v) and v >= 0):
        raise _bad(op, where, "a finite number >= 0 (or absent)", v)


_CAPABILITIES: dict[str, dict] = {}  # repr of a capability -> its normalised form (a worker repeats its own)
_CAPABILITIES_MAX = 1024


def _capability(op, name, v):
    """A worker's capability, checked key by key where policy reads it, then normalised. Every claim of a
    worker repeats the same capability, so a checked one is remembered by its ``repr`` (which tells 4 from
    4.0 and True): the result depends on nothing else."""
    if not isinstance(v, dict):
        raise _bad(op, name, "an object", v)
    key = repr(v)
    hit = _CAPABILITIES.get(key)
    if hit is not None:
        return dict(hit)
    out = _check_capability(op, name, v)
    if len(_CAPABILITIES) >= _CAPABILITIES_MAX:
        _CAPABILITIES.clear()
    _CAPABILITIES[key] = out
    return dict(out)


def _check_capability(op, name, v):
    check_json(op, name, v, max_bytes=CAPABILITY_BYTES_MAX)
    for key in ("ram_gib", "disk_free_gib", "vram_gib", "cores", "slots"):
        _nonneg(op, f"{name}.{key}", v.get(key))
    if v.get("cuda") is not None and not isinstance(v["cuda"], bool):
        raise _bad(op, f"{name}.cuda", "true or false", v["cuda"])
    for key in ("host", "os", "python", "torch", "git_commit"):
        if v.get(key) is not None and not isinstance(v[key], str):
            raise _bad(op, f"{name}.{key}", "a string (or absent)", v[key])
    gpus = v.get("gpus")
    if gpus is not None:
        if not isinstance(gpus, list) or len(gpus) > GPUS_MAX:
            raise _bad(op, f"{name}.gpus", f"a list of at most {GPUS_MAX} objects", gpus)
        for i, gpu in enumerate(gpus):
            if not isinstance(gpu, dict):
                raise _bad(op, f"{name}.gpus[{i}]", "an object with index, name, vram_gib", gpu)
            _nonneg(op, f"{name}.gpus[{i}].vram_gib", gpu.get("vram_gib"))
            index = gpu.get("index")
            if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1024):
                raise _bad(op, f"{name}.gpus[{i}].index", "a GPU index from 0 to 1023 (or absent)", index)
            if gpu.get("name") is not None and not isinstance(gpu["name"], str):
                raise _bad(op, f"{name}.gpus[{i}].name", "a string (or absent)", gpu["name"])
    return normalize_capability(v)


def _opt_metrics(op, name, v):
    """Final metrics: an object whose finite numbers are kept (results.final_metrics); anything else is dropped."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _bad(op, name, 'an object of metric names and numbers, e.g. {"val_loss": 0.31}', v)
    return final_metrics(v)


def _text(limit):
    def check(op, name, v):
        if not isinstance(v, str):
            raise _bad(op, name, "a string", v)
        return v[-limit:]
    return check


def _opt_text(limit):
    check = _text(limit)
    return lambda op, name, v: None if v is None else check(op, name, v)


def _short_text(op, name, v):
    if not isinstance(v, str) or not v or len(v) > 4096:
        raise _bad(op, name, "a non-empty string", v)
    return v


def _size(op, name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _bad(op, name, "a whole number of bytes >= 0", v)
    return v


def _opt_epoch(op, name, v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**53:
        raise _bad(op, name, "a whole number of epochs >= 0, or null", v)
    return v


def _manifest(op, name, v):
    if not isinstance(v, dict):
        raise _bad(op, name, "an object (Manifest.to_json())", v)
    check_json(op, name, v, max_bytes=MANIFEST_BYTES_MAX, depth=16, items=10_000_000)
    return v


def _opt_slot(op, name, v):
    """A claim's slot: {"index": n >= 0, "gpus": [GPU index, ...] or [{"index", "free_vram_gib"?}, ...]}."""
    if v is None:
        return None
    want = 'an object {"index": slot number, "gpus": [{"index": GPU index, "free_vram_gib": GiB}, ...]}'
    if not isinstance(v, dict):
        raise _bad(op, name, want, v)
    index = v.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1024:
        raise _bad(op, f"{name}.index", "a slot number from 0 to 1023", index)
    raw = v.get("gpus", [])
    if not isinstance(raw, list) or len(raw) > 64:
        raise _bad(op, f"{name}.gpus", "a list of at most 64 GPUs", raw)
    gpus, free = [], {}
    for i, g in enumerate(raw):
        gpu = g.get("index") if isinstance(g, dict) else g
        if isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu < 1024:
            raise _bad(op, f"{name}.gpus[{i}]", "a GPU index from 0 to 1023, or an object with one", g)
        gpus.append(gpu)
        f = g.get("free_vram_gib") if isinstance(g, dict) else None
        if f is not None:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 0:
                raise _bad(op, f"{name}.gpus[{i}].free_vram_gib", "a number of GiB >= 0", f)
            free[gpu] = float(f)
    return {"index": index, "gpus": gpus, "free": free}


def _job_list(op, name, v):
    """Submitted jobs: a list of JobSpec.to_json() objects, as many as one sweep may have, bounded like a manifest."""
    if not isinstance(v, list) or not v or len(v) > 10_000:
        raise _bad(op, name, "a list of 1 to 10000 jobs", v)
    for i, job in enumerate(v):
        if not isinstance(job, dict) or not isinstance(job.get("model"), str) or not isinstance(job.get("mode"), str):
            raise _bad(op, f"{name}[{i}]", "a job object with model and mode", job)
    check_json(op, name, v, max_bytes=MANIFEST_BYTES_MAX, depth=16, items=10_000_000)
    return v


def _opt_job_ids(op, name, v):
    """Job ids a sweep leaves alone (the sweeper's monotonic clock saw their leases renewed within the window)."""
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > 1_000_000:
        raise _bad(op, name, "a list of job ids", v)
    return [_job_id(op, f"{name}[{i}]", j) for i, j in enumerate(v)]
def _key(op, name, v):
    if not isinstance(v, str) or not SHA256_RE.match(v):
        raise _bad(op, name, "a key of 64 lowercase hex digits, drawn by the coordinator that took the request", v)
    return v


def _operator(op, name, v):
    if not isinstance(v, str) or not OPERATOR_NAME_RE.fullmatch(v):
        raise _bad(op, name, "an operator name (1-64 letters, digits, '.', '_', '-', '@')", v)
    return v


def _flag(op, name, v):
    if not isinstance(v, bool):
        raise _bad(op, name, "true or false", v)
    return v


def _failure_class(op, name, v):
    if v not in FAILURE_CLASSES:
        raise _bad(op, name, f"one of {', '.join(sorted(FAILURE_CLASSES))}", v)
    return v


def manifest_sha256(text: str) -> str:
    """The manifest's identity: the sha256 of its text in UTF-8 (as ``jobs peers`` shows it)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _opt_source(op, name, v):
    """The manifest as the operator sent it: its text and the file's name; its sha256 is computed here."""
    if v is None:
        return None
    if (not isinstance(v, dict) or not isinstance(v.get("text"), str) or len(v["text"]) > MANIFEST_BYTES_MAX
            or not isinstance(v.get("name"), str) or len(v["name"]) > 4096):
        raise _bad(op, name, "an object with the manifest's text and the file's name", v)
    try:
        sha = manifest_sha256(v["text"])
    except UnicodeEncodeError:
        raise _bad(op, name, "text without lone surrogates", v["text"][:40]) from None
    return {"text": v["text"], "name": v["name"], "sha256": sha}


def _flag(op, name, v):
    if not isinstance(v, bool):
        raise _bad(op, name, "true or false", v)
    return v


REQUIRED = object()

# op -> {field: (checker, default)}; every op also takes "now".
OPS: dict[str, dict[str, tuple]] = {
    "sync_manifest": {"manifest": (_manifest, REQUIRED), "source": (_opt_source, None), "seed_only": (_flag, False)},
    "submit_jobs": {"jobs": (_job_list, REQUIRED)},
    "register_worker": {"host": (_host, REQUIRED), "capability": (_capability, REQUIRED)},
    "leave_worker": {"host": (_host, REQUIRED)},
    "claim": {"host": (_host, REQUIRED), "capability": (_capability, REQUIRED), "lease": (_lease, REQUIRED),
              "slot": (_opt_slot, None)},
    "heartbeat": {"job_id": (_job_id, REQUIRED), "host": (_host, REQUIRED), "lease": (_opt_lease, None),
                  "progress": (_opt_progress, None), "log_tail": (_opt_text(LOG_TAIL_MAX), None)},
    "record_artifact": {"artifact_id": (_sha, REQUIRED), "job_id": (_job_id, REQUIRED), "host": (_host, REQUIRED),
                        "lease": (_opt_lease, None), "model": (_short_text, REQUIRED),
                        "mode": (_short_text, REQUIRED), "size": (_size, REQUIRED), "path": (_short_text, REQUIRED)},
    "complete": {"job_id": (_job_id, REQUIRED), "host": (_host, REQUIRED), "lease": (_opt_lease, None),
                 "artifact_id": (_sha, REQUIRED), "metrics": (_opt_metrics, None),
                 "progress": (_opt_progress, None)},
    "fail": {"job_id": (_job_id, REQUIRED), "host": (_host, REQUIRED), "lease": (_opt_lease, None),
             "error": (_text(ERROR_MAX), REQUIRED), "failure_class": (_failure_class, CLASS_JOB)},
    "release": {"job_id": (_job_id, REQUIRED), "host": (_host, REQUIRED), "lease": (_opt_lease, None)},
    "cancel": {"job_id": (_job_id, REQUIRED), "by": (_operator, None)},
    "requeue": {"job_id": (_job_id, REQUIRED), "by": (_operator, None)},
    "host_key_set": {"host": (_host, REQUIRED), "key": (_key, REQUIRED), "by": (_operator, REQUIRED),
                     "rotate": (_flag, False)},
    "host_key_revoke": {"host": (_host, REQUIRED), "by": (_operator, REQUIRED)},
    "sweep_stale": {"hold": (_opt_job_ids, None)},
    "record_checkpoint": {"job_id": (_job_id, REQUIRED), "host": (_host, REQUIRED), "lease": (_opt_lease, None),
                          "sha256": (_sha, REQUIRED), "epoch": (_opt_epoch, None), "size": (_size, REQUIRED),
                          "model": (_short_text, REQUIRED), "mode": (_short_text, REQUIRED)},
    "record_log": {"job_id": (_job_id, REQUIRED), "host": (_host, REQUIRED), "lease": (_opt_lease, None),
                   "sha256": (_sha, REQUIRED), "size": (_size, REQUIRED), "model": (_short_text, REQUIRED),
                   "mode": (_short_text, REQUIRED)},
}


def session(cmd: object) -> tuple[str, int] | None:
    """(client_id, serial) of a command that carries them, else None."""
    if not isinstance(cmd, dict) or cmd.get("client_id") is None:
        return None
    client_id, serial = cmd["client_id"], cmd.get("serial")
    if not isinstance(client_id, str) or not 0 < len(client_id) <= 128:
        raise BadRequest(f"field 'client_id' must be a string of 1-128 characters; got {client_id!r:.60}")
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 1:
        raise BadRequest(f"field 'serial' must be a whole number >= 1 with 'client_id'; got {serial!r:.60}")
    return client_id, serial


def parse(cmd: object) -> tuple[str, dict]:
    """(op, arguments) of a command, or BadRequest naming the unknown op or the bad field."""
    if not isinstance(cmd, dict):
        raise BadRequest(f"a queue command must be an object with 'op' and 'now'; got {type(cmd).__name__}")
    op = cmd.get("op")
    if op not in OPS:
        raise BadRequest(f"unknown queue command op {str(op)[:40]!r}; expected one of {', '.join(sorted(OPS))}")
    if "now" not in cmd:
        raise BadRequest(f"{op}: missing field 'now' (seconds since the epoch, from the caller)")
    args = {"now": _number(op, "now", cmd["now"])}
    for name, (check, default) in OPS[op].items():
        if name not in cmd or (cmd[name] is None and default is REQUIRED):
            if default is REQUIRED:
                raise BadRequest(f"{op}: missing field {name!r}")
            args[name] = default
        else:
            args[name] = check(op, name, cmd[name])
    return op, args


def validate(cmd: object) -> dict:
    """The command normalised, ready to propose or batch; BadRequest naming the field otherwise.

    A claim to be replicated carries ``lease_from_index: true`` instead of a lease (the log index of
    its entry becomes the lease when it is applied)."""
    from_index = isinstance(cmd, dict) and cmd.get("op") == "claim" and cmd.get("lease_from_index") is True
    if from_index:
        cmd = {**cmd, "lease": "from-index"}
    op, args = parse(cmd)
    out = {"op": op, **args}
    if from_index:
        out["lease"] = None
        out["lease_from_index"] = True
    if out.get("slot") is not None:  # back in the wire's shape, so that validating again gives the same
        slot = out["slot"]
        out["slot"] = {"index": slot["index"], "gpus": [
            {"index": g, "free_vram_gib": slot["free"][g]} if g in slot["free"] else g for g in slot["gpus"]]}
    s = session(cmd)
    if s is not None:
        out["client_id"], out["serial"] = s
    return out
