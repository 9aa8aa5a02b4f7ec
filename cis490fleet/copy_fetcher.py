"""Every copy the queue records (model bundles, checkpoints, attempt logs) kept on this peer: a background loop.

Shell. One thread lists the copies the queue records that this peer's stores
lack and fetches each from a peer that has it, by sha256 (the store verifies
it). A copy that no peer could give is tried again later, its wait doubling up
to ``BACKOFF_MAX_S``, until it is here: a peer that was down when an upload
was pushed, or that installed a snapshot naming uploads it never saw, catches
up by itself. ``wake()`` (a record applied, a snapshot installed) starts a new
round at once; ``missing()`` is what ``jobs peers`` shows.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time

from cis490fleet import errors

log = logging.getLogger(__name__)

ROUND_S = 5.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


class CopyFetcher:
    """``replicator`` gives ``recorded_copies()`` (dicts with artifact_id, kind, model, mode, job_id, host, now),
    ``store_of(kind)`` and ``fetch_copy(copy) -> bool`` (from the first peer that has it)."""

    def __init__(self, replicator):
        self.replicator = replicator
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._missing: dict[str, dict] = {}
        self._retry: dict[str, tuple[float, float]] = {}  # sha -> (next try on the monotonic clock, wait)
        self._thread = threading.Thread(target=self._run, name="copy-fetcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def missing(self) -> int:
        """How many recorded copies this peer lacked at the last look."""
        with self._lock:
            return len(self._missing)

    def _lacking(self) -> dict[str, dict]:
        out = {}
        for copy in self.replicator.recorded_copies():
            try:
                here = self.replicator.store_of(copy.get("kind")).locate(copy["artifact_id"]) is not None
            except errors.FleetError:
                continue
            if not here:
                out[copy["artifact_id"]] = copy
        return out

    def run_once(self, now: float) -> float:
        """One round: look again at what is missing and fetch what is due; returns seconds to the next due try."""
        try:
            lacking = self._lacking()
        except errors.FleetError as err:
            log.info("could not list the recorded copies to fetch the missing ones: %s", err)
            return ROUND_S
        with self._lock:
            self._missing = dict(lacking)
        self._retry = {sha: r for sha, r in self._retry.items() if sha in lacking}
        next_due = ROUND_S
        for sha, copy in lacking.items():
            if self._stop.is_set():
                break
            due, wait = self._retry.get(sha, (0.0, BACKOFF_FIRST_S / 2))
            if due > now:
                next_due = min(next_due, due - now)
                continue
            try:
                fetched = self.replicator.fetch_copy(copy)
            except (OSError, http.client.HTTPException, errors.FleetError) as err:
                log.info("could not fetch %s %s: %s", copy.get("kind") or "artifact", sha[:12], err)
                fetched = False
            if fetched:
                self._retry.pop(sha, None)
                with self._lock:
                    self._missing.pop(sha, None)
            else:
                wait = min(wait * 2, BACKOFF_MAX_S)
                self._retry[sha] = (time.monotonic() + wait, wait)
                next_due = min(next_due, wait)
        return next_due

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pause = self.run_once(time.monotonic())
            except Exception:  # never let one bad round end the loop: the copies must come
                log.exception("fetching missing copies failed; trying again in %.0f s", ROUND_S)
                pause = ROUND_S
            self._wake.wait(pause)
            self._wake.clear()
