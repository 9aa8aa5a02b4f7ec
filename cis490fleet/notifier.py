"""Delivers ``[[notify]]`` webhooks from one background thread: it never holds up the queue.

The commit path only appends what it committed to a bounded inbox (a full inbox drops the oldest
and counts it). The thread turns those commands into events with reads of the store, POSTs each
to the targets that want it, and retries a target that does not answer 2xx with doubling backoff
(``notify.backoff_s``) up to ``notify.MAX_TRIES`` tries. Only the leader of a peer group sends, so a
group of three does not notify three times; a leadership change can drop or repeat a notification
that was in flight (delivery is at least once per leader, never held up by a dead receiver).
"""

from __future__ import annotations

import collections
import heapq
import http.client
import itertools
import logging
import os
import ssl
import threading
import time
import urllib.parse

from cis490fleet import notify
from cis490fleet.errors import FleetError
from cis490fleet.model import NotifyTarget

log = logging.getLogger(__name__)

WATCHED_OPS = frozenset({"complete", "fail", "cancel", "sweep_stale"})
MAX_INBOX = 10_000
POST_TIMEOUT_S = 10.0


class Notifier:
    def __init__(self, store, fleet, *, is_leader=lambda: True, env=None, clock=time.time):
        """``store`` is the JobStore (read only here); ``fleet()`` the FleetConfig in force."""
        self.store = store
        self.fleet = fleet
        self.is_leader = is_leader
        self.env = os.environ if env is None else env
        self.clock = clock
        self.counters = collections.Counter()
        self._inbox: collections.deque = collections.deque()
        self._due: list = []  # heap of (when, seq, target, event, tries)
        self._seq = itertools.count()
        self._sweeps_sent: dict[str, tuple] = {}
        self._unsigned_warned: set[str] = set()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the commit path's side --

    def observe(self, cmds: list[dict], results: list) -> None:
        """Called after each commit with its commands and results; cheap and never blocks (no reads here:
        the thread decides whether anyone wants to hear of them)."""
        picked = [(c, r) for c, r in zip(cmds, results)
                  if c.get("op") in WATCHED_OPS and not isinstance(r, BaseException)]
        if not picked:
            return
        with self._cv:
            for item in picked:
                if len(self._inbox) >= MAX_INBOX:
                    self._inbox.popleft()
                    self.counters["dropped"] += 1
                self._inbox.append(item)
            self._cv.notify()

    # -- the thread --

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                wait = None if not self._due else max(0.0, self._due[0][0] - self.clock())
                if not self._inbox and (wait is None or wait > 0):
                    self._cv.wait(wait)
                items = list(self._inbox)
                self._inbox.clear()
            try:
                if items and self.fleet().notify and self.is_leader():
                    for cmd, result in items:
                        self._schedule(self._events(cmd, result))
                self._deliver_due()
            except Exception:  # a bug here must not end notifications for the life of serve
                log.exception("notifier: unexpected error; carrying on")
                self.counters["errors"] += 1
                self._stop.wait(1.0)

    def _schedule(self, events: list[notify.Event]) -> None:
        targets = self.fleet().notify
        now = self.clock()
        for event in events:
            for target in notify.wanted(targets, event):
                heapq.heappush(self._due, (now, next(self._seq), target, event, 0))

    def _deliver_due(self) -> None:
        while self._due and self._due[0][0] <= self.clock() and not self._stop.is_set():
            _, _, target, event, tries = heapq.heappop(self._due)
            tries += 1
            problem = self._post(target, event)
            if problem is None:
                self.counters["sent"] += 1
                continue
            if tries >= notify.MAX_TRIES:
                self.counters["failed"] += 1
                log.warning("notify %s: gave up on %s %s after %d tries: %s", _where(target.url), event.kind,
                            event.subject[:40], tries, problem)
                continue
            self.counters["retried"] += 1
            heapq.heappush(self._due, (self.clock() + notify.backoff_s(tries), next(self._seq), target, event, tries))

    def _post(self, target: NotifyTarget, event: notify.Event) -> str | None:
        """POST one notification; None when the receiver answered 2xx, else what went wrong."""
        now = self.clock()
        body = notify.body(target, event, self.fleet().name, now)
        headers = {"content-type": "application/json", "user-agent": "cis490fleet-notify",
                   notify.EVENT_HEADER: event.kind, notify.TIMESTAMP_HEADER: str(int(now))}
        secret = self.env.get(target.secret_env) if target.secret_env else None
        if secret:
            headers[notify.SIGNATURE_HEADER] = notify.sign(secret, int(now), body)
        elif target.secret_env and target.url not in self._unsigned_warned:
            self._unsigned_warned.add(target.url)
            log.warning("notify %s: %s is not set in serve's environment; sending unsigned", _where(target.url),
                        target.secret_env)
        parts = urllib.parse.urlsplit(target.url)
        try:
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=POST_TIMEOUT_S,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=POST_TIMEOUT_S)
            try:
                conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
                resp = conn.getresponse()
                resp.read(1 << 16)
            finally:
                conn.close()
        except (OSError, http.client.HTTPException) as err:
            return f"{type(err).__name__}: {err}"
        return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"

    # -- from committed commands to events --

    def _events(self, cmd: dict, result: dict) -> list[notify.Event]:
        op, now = cmd["op"], self.clock()
        events: list[notify.Event] = []
        sweeps: set[str] = set()
        try:
            if op == "sweep_stale":
                if not (result.get("recovered") or result.get("failed")):
                    return []
                events += self._stale_events(cmd, result, now, sweeps)
            else:
                job = self.store.job(cmd["job_id"], now)
                if op == "complete":
                    events.append(notify.job_event("completed", job))
                elif op == "fail" and result.get("status") == "failed":
                    events.append(notify.job_event("failed", job))
                if job.get("spec", {}).get("sweep"):
                    sweeps.add(job["spec"]["sweep"])
            for sweep in sorted(sweeps):
                events += self._sweep_event(sweep)
        except FleetError as err:
            log.warning("notify: could not read what %s changed: %s", op, err)
        return events

    def _stale_events(self, cmd: dict, result: dict, now: float, sweeps: set[str]) -> list[notify.Event]:
        """The sweep reports counts only: its attempts are the stale ones that ended at the sweep's ``now``."""
        ended = cmd.get("now")
        taken = [f for f in self.store.recent_failures(int(result.get("recovered", 0)) + int(result.get("failed", 0))
                                                       + 100)
                 if f["outcome"] == "stale" and f["ended"] == ended]
        by_host: dict[str, list[str]] = {}
        events = []
        for f in taken:
            by_host.setdefault(f["host"], []).append(f["job_id"])
            if f["status"] == "failed":
                job = self.store.job(f["job_id"], now)
                events.append(notify.job_event("failed", job))
                if job.get("spec", {}).get("sweep"):
                    sweeps.add(job["spec"]["sweep"])
        return [notify.host_lost(host, ids, ended) for host, ids in sorted(by_host.items())] + events

    def _sweep_event(self, sweep: str) -> list[notify.Event]:
        counts, last_update = self.store.sweep_counts(sweep)
        event = notify.sweep_done(sweep, counts)
        key = (tuple(sorted(counts.items())), last_update)
        if event is None or self._sweeps_sent.get(sweep) == key:
            return []
        self._sweeps_sent[sweep] = key
        return [event]


def _where(url: str) -> str:
    """A target's URL without its path and query, which often carry a secret (Slack's do)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
