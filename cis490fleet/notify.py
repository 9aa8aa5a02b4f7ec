"""Webhook notifications: which events a committed command gives, their payloads, and their signature.

Pure: the delivery (threads, sockets, retries on the clock) is ``notifier.py``'s. A receiver checks
``x-cis490-signature: sha256=<hex>``, the HMAC-SHA256 under its shared secret of
``<x-cis490-timestamp>.<body>``, and refuses a timestamp far from its own clock, so a recorded
notification cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from cis490fleet.model import FINAL_STATUSES, NotifyTarget

SIGNATURE_HEADER = "x-cis490-signature"
TIMESTAMP_HEADER = "x-cis490-timestamp"
EVENT_HEADER = "x-cis490-event"
MAX_TRIES = 8
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0


@dataclass(frozen=True)
class Event:
    kind: str  # one of model.NOTIFY_EVENTS
    subject: str  # what it is about: a job id, a sweep name, a host id (used to word it, and in tests)
    data: dict


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: int, body: bytes, signature: str, now: float, window_s: float = 300.0) -> bool:
    """What a receiver does with a notification: the signature matches and the timestamp is recent."""
    return abs(now - timestamp) <= window_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def backoff_s(tries: int) -> float:
    """Seconds before try ``tries + 1``: 1, 2, 4, … up to five minutes."""
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** max(0, tries - 1))


def _job_data(job: dict) -> dict:
    spec = job.get("spec") or {}
    return {"job_id": job["id"], "name": job.get("name"), "model": job.get("model"), "mode": job.get("mode"),
            "hyper": job.get("hyper", spec.get("hyper", {})), "seed": job.get("seed", spec.get("seed")),
            "sweep": spec.get("sweep"), "status": job.get("status"), "host": job.get("host"),
            "attempts": job.get("attempt_count", job.get("attempts")), "artifact_id": job.get("artifact_id"),
            "progress": job.get("progress"), "error": job.get("last_error")}


def job_event(kind: str, job: dict) -> Event:
    """``completed`` or ``failed`` for a job, from its detail (``JobStore.job``)."""
    return Event(kind, job["id"], _job_data(job))


def host_lost(host: str, job_ids: list[str], now: float) -> Event:
    """A host stopped heartbeating: the stale sweep took ``job_ids`` back from it."""
    return Event("host_lost", host, {"host": host, "jobs": list(job_ids), "at": now})


def sweep_done(sweep: str, counts: dict[str, int]) -> Event | None:
    """The sweep's event when every one of its jobs is final (completed, failed or cancelled), else None."""
    total = sum(counts.values())
    if total == 0 or any(n and status not in FINAL_STATUSES for status, n in counts.items()):
        return None
    return Event("sweep_done", sweep, {"sweep": sweep, "jobs": total,
                                       "counts": {s: n for s, n in sorted(counts.items()) if n}})


def summary(event: Event, fleet_name: str) -> str:
    """One line a person reads in a chat window."""
    d = event.data
    if event.kind in ("completed", "failed"):
        label = d.get("name") or d["job_id"][:12]
        text = f"[{fleet_name}] job {label} ({d.get('model')}/{d.get('mode')}) {event.kind}"
        if event.kind == "failed" and d.get("error"):
            text += f": {str(d['error']).splitlines()[0][:200]}"
        elif d.get("host"):
            text += f" on {d['host']}"
        return text
    if event.kind == "sweep_done":
        parts = ", ".join(f"{n} {s}" for s, n in d["counts"].items())
        return f"[{fleet_name}] sweep {d['sweep']} finished: {parts}"
    return f"[{fleet_name}] host {d['host']} went silent; {len(d['jobs'])} job(s) taken back"


def body(target: NotifyTarget, event: Event, fleet_name: str, now: float) -> bytes:
    """The POST body for ``target``: the event as JSON, or Slack's ``{"text": …}`` for ``format = "slack"``."""
    if target.format == "slack":
        payload: dict = {"text": summary(event, fleet_name)}
    else:
        payload = {"event": event.kind, "fleet": fleet_name, "at": now, "summary": summary(event, fleet_name),
                   **event.data}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


def wanted(targets: tuple[NotifyTarget, ...], event: Event) -> list[NotifyTarget]:
    return [t for t in targets if event.kind in t.on]
