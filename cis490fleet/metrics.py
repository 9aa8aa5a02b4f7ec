"""``GET /metrics``: the coordinator's state and counters in the Prometheus text exposition format (0.0.4).

Adapter for the HTTP API (registered through ``http_api.EXTENSIONS``). Reads
only through the application object handed in with the request (``health()``,
``workers()``, ``counters.snapshot()``, ``artifacts.total_bytes()``, duck-typed),
so it never opens the queue itself. ``render`` is a pure function of what was
read; the one thing measured here is how long claim requests take to answer,
by wrapping the claim route's handler.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Iterable

from cis490fleet import model


PREFIX = "cis490fleet"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLAIM_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROLES = ("leader", "follower", "candidate")

COUNTER_HELP = {
    "claims": "Claims that handed a job to a worker.",
    "empty_claims": "Claims answered with no job (nothing eligible).",
    "completions": "Jobs completed by their worker.",
    "failures": "Failure reports from workers (each failed attempt).",
    "stale_recoveries": "Jobs put back in the queue after their worker stopped heartbeating.",
    "stale_failures": "Jobs failed for good after their last attempt went stale.",
    "commands": "Queue commands applied.",
    "batches": "Group commits (transactions) of queue commands.",
    "requests": "HTTP requests answered.",
    "errors_4xx": "HTTP requests answered with a 4xx status.",
    "errors_5xx": "HTTP requests answered with a 5xx status.",
}


# -- the claim-latency histogram ---------------------------------------------------------------------


class Histogram:
    """A thread-safe histogram of seconds, one series per ``outcome`` label."""

    def __init__(self, buckets: Iterable[float] = CLAIM_BUCKETS_S):
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._series: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, seconds: float, outcome: str = "") -> None:
        with self._lock:
            counts, total = self._series.setdefault(outcome, ([0] * (len(self.buckets) + 1), [0.0]))
            for i, bound in enumerate(self.buckets):
                if seconds <= bound:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            total[0] += seconds

    def series(self, outcome: str = "") -> dict:
        """One outcome's ``{"buckets", "sum", "count"}`` as in ``snapshot``; all zero before it is observed."""
        return self.snapshot().get(outcome) or {"buckets": [(b, 0) for b in self.buckets + (math.inf,)],
                                                "sum": 0.0, "count": 0}

    def snapshot(self) -> dict[str, dict]:
        """``{outcome: {"buckets": [(le, cumulative count)...], "sum", "count"}}``, +Inf last."""
        out = {}
        with self._lock:
            for outcome, (counts, total) in self._series.items():
                cumulative, n = [], 0
                for bound, c in zip(self.buckets + (math.inf,), counts):
                    n += c
                    cumulative.append((bound, n))
                out[outcome] = {"buckets": cumulative, "sum": total[0], "count": n}
        return out


def timed_claims(handler: Callable, histogram: Histogram) -> Callable:
    """``handler`` (the claim route's), observing how long each answer took, by outcome job/empty."""

    def claim(req):
        t0 = time.perf_counter()
        result = handler(req)
        outcome = "empty" if isinstance(result, dict) and result.get("job") is None else "job"
        histogram.observe(time.perf_counter() - t0, outcome)
        return result

    claim.__wrapped__ = handler
    return claim


# -- text format ------------------------------------------------------------------------------------


def _escape_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _labels(labels: dict | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


class _Text:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: Any, labels: dict | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_value(value)}")

    def histogram(self, name: str, help_text: str, series: dict[str, dict], label: str | None = None,
                  scale: float = 1.0) -> None:
        """``series``: label value -> snapshot (cumulative (le, count) pairs, sum, count); ``scale`` converts units."""
        self.family(name, "histogram", help_text)
        for key, snap in sorted(series.items()):
            extra = {label: key} if label else {}
            for le, count in snap["buckets"]:
                le_text = "+Inf" if math.isinf(le) else _value(le * scale)
                self.sample(f"{name}_bucket", count, {**extra, "le": le_text})
            self.sample(f"{name}_sum", snap["sum"] * scale, extra)
            self.sample(f"{name}_count", snap["count"], extra)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _peer_rows(health: dict) -> list[dict]:
    """Per peer: id, role, term, commit_index (those known), this node first."""
    rows: dict[str, dict] = {}
    me = health.get("node_id")
    if me:
        rows[me] = {k: health.get(k) for k in ("role", "term", "commit_index")}
    for peer in health.get("peers") or []:
        if not isinstance(peer, dict) or not peer.get("id"):
            continue
        row = rows.setdefault(str(peer["id"]), {})
        for key in ("role", "term", "commit_index"):
            if peer.get(key) is not None:
                row[key] = peer[key]
        if row.get("role") is None and health.get("leader") is not None and str(peer["id"]) == health["leader"]:
            row["role"] = "leader"
    return [{"id": pid, **row} for pid, row in rows.items()]


def render(*, health: dict, workers: list[dict], counters: dict, artifact_bytes: int | None,
           claim_latency: dict[str, dict] | None = None) -> str:
    """The exposition text for one scrape, from what the coordinator answered."""
    out = _Text()
    out.family(f"{PREFIX}_info", "gauge", "This coordinator peer: version and node id (always 1).")
    out.sample(f"{PREFIX}_info", 1, {"version": health.get("version", ""), "node": health.get("node_id", "")})

    counts = health.get("jobs") or {}
    out.family(f"{PREFIX}_jobs", "gauge", "Jobs in the queue by status.")
    for status in list(model.STATUSES) + sorted(set(counts) - set(model.STATUSES)):
        out.sample(f"{PREFIX}_jobs", int(counts.get(status, 0) or 0), {"status": status})

    out.family(f"{PREFIX}_workers_live", "gauge", "Workers seen within the fleet's worker timeout.")
    out.sample(f"{PREFIX}_workers_live", sum(1 for w in workers if w.get("live")))
    out.family(f"{PREFIX}_workers_known", "gauge", "Workers that ever registered or claimed.")
    out.sample(f"{PREFIX}_workers_known", len(workers))
    out.family(f"{PREFIX}_jobs_held", "gauge", "Jobs held (claimed or running) by each worker.")
    for w in workers:
        out.sample(f"{PREFIX}_jobs_held", len(w.get("running") or []), {"host": w.get("host", "")})

    for name, value in sorted((counters.get("counters") or {}).items()):
        metric = f"{PREFIX}_{name}_total"
        out.family(metric, "counter", COUNTER_HELP.get(name, f"Count of {name.replace('_', ' ')}."))
        out.sample(metric, value)

    latency = counters.get("latency_ms")
    if latency:
        out.histogram(f"{PREFIX}_request_duration_seconds", "Time to answer an HTTP request.", {"": latency},
                      scale=0.001)
    own = counters.get("claim_latency_ms")
    if own:
        out.histogram(f"{PREFIX}_claim_duration_seconds", "Time to apply a claim in the queue.", {"": own},
                      scale=0.001)
    elif claim_latency is not None:
        out.histogram(f"{PREFIX}_claim_duration_seconds",
                      "Time to answer a claim request (outcome=empty includes the long-poll wait the worker "
                      "asked for).", claim_latency or {}, label="outcome")

    if artifact_bytes is not None:
        out.family(f"{PREFIX}_artifact_bytes", "gauge", "Bytes of model bundles in the artifact store.")
        out.sample(f"{PREFIX}_artifact_bytes", int(artifact_bytes))

    peers = _peer_rows(health)
    if any(p.get("role") for p in peers):
        out.family(f"{PREFIX}_peer_role", "gauge", "Each coordinator peer's Raft role (1 for its current role).")
        for p in peers:
            if p.get("role"):
                for role in ROLES + ((p["role"],) if p["role"] not in ROLES else ()):
                    out.sample(f"{PREFIX}_peer_role", int(p["role"] == role), {"peer": p["id"], "role": role})
    for key, help_text in (("term", "Each coordinator peer's current Raft term."),
                           ("commit_index", "Each coordinator peer's Raft commit index.")):
        known = [p for p in peers if isinstance(p.get(key), (int, float)) and not isinstance(p.get(key), bool)]
        if known:
            out.family(f"{PREFIX}_peer_{key}", "gauge", help_text)
            for p in known:
                out.sample(f"{PREFIX}_peer_{key}", p[key], {"peer": p["id"]})
    return out.text()


# -- the page ---------------------------------------------------------------------------------------


def _artifact_bytes(app) -> int | None:
    """The stored bundles' bytes as the queue records them: a scrape costs one SUM, not a walk of the disk."""
    store = getattr(app, "store", None)
    if store is None or not hasattr(store, "total_artifact_bytes"):
        return None
    return int(store.total_artifact_bytes())


def scrape(app, claim_latency: Histogram | None = None) -> str:
    """Read everything from ``app`` and render it."""
    counters = app.counters.snapshot() if getattr(app, "counters", None) is not None else {}
    workers = app.workers() if hasattr(app, "workers") else []
    return render(health=app.health(), workers=workers, counters=counters, artifact_bytes=_artifact_bytes(app),
                  claim_latency=claim_latency.snapshot() if claim_latency is not None else None)


def register(router) -> None:
    """Serve GET /metrics and time the claims answered by this router's server."""
    claims = Histogram()
    for route in router.routes:
        if (route.method, route.template) == ("POST", "/v1/job/claim"):
            route.handler = timed_claims(route.handler, claims)  # in place: the route keeps its position

    def metrics_page(req):
        req.require_reader()
        return 200, CONTENT_TYPE, scrape(req.app, claims).encode()

    router.add("GET", "/metrics", metrics_page)
