"""Result delivery: bundle a finished attempt's output, upload it and complete the job, or report its failure.

A result is written to ``<work>/pending/`` (a JSON record, plus the bundle) before it
is sent and removed only once the coordinator has answered, so a coordinator outage
or a worker restart loses no training. Never starts or stops a trainer.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from cis490fleet import attempt_log, errors, jobs, results
from cis490fleet.slots import COMPLETED, FAILED, LOST, PENDING
from cis490fleet.trainer_process import TrainerRun
from cis490fleet.worker_view import logger

log = logger(__name__)
METRICS_JSON_MAX = 1 << 20


class Outbox:
    """Results on their way to the coordinator, kept on disk in ``pending_dir`` until acknowledged."""

    def __init__(self, client: Any, pending_dir: Path, stopping: threading.Event):
        self.client = client
        self.pending_dir = pending_dir
        self.stopping = stopping  # set: stop waiting between upload tries, keep the result for later
        self.upload_tries = 4
        self.backoff_s = 1.0
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._sending: set[str] = set()
        self._retry_at = 0.0

    @property
    def retry_at(self) -> float:
        """When a job this worker reported as failed may come back to the queue (0: none may)."""
        with self._lock:
            return self._retry_at

    def finish(self, run: TrainerRun) -> str:
        from cis490fleet import bundle

        try:
            path, sha256, size = bundle.make_bundle(run.out, self.pending_dir / run.job_id)
        except (OSError, errors.FleetError) as err:
            # A full disk is this host's problem, not the job's: retried like any other host problem.
            full = errors.disk_full(err, str(self.pending_dir)) if isinstance(err, OSError) else None
            return self.report_failure(run, f"cannot bundle the trainer's output {run.out}: {full or err}",
                                       jobs.CLASS_INFRA if full else jobs.CLASS_JOB)
        log.info("job %s: trainer done; bundle %s (%d bytes)", run.label, Path(path).name, size)
        record = {"action": "complete", "job_id": run.job_id, "lease": run.lease, "attempt": run.attempt,
                  "bundle": str(path), "sha256": sha256, "size": size, "label": run.label,
                  "metrics": final_metrics(run), "progress": run.progress()}
        return self.deliver(self._with_log(record, run))

    def report_failure(self, run: TrainerRun, error: str, failure_class: str, extra: dict | None = None) -> str:
        """Report the attempt failed; ``failure_class`` (``jobs.FAILURE_CLASSES``) decides whether it is retried.
        ``extra``: a checkpoint kept for later (``CheckpointSync.hand_over``), handed in before the failure."""
        record = {"action": "fail", "job_id": run.job_id, "lease": run.lease, "attempt": run.attempt,
                  "error": error, "class": failure_class, "label": run.label, **(extra or {})}
        return self.deliver(self._with_log(record, run))

    def _with_log(self, record: dict, run: TrainerRun) -> dict:
        """The record, with the attempt's whole log packed beside it: it goes out before the result, while the
        lease still holds."""
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        try:
            path, sha256, _ = attempt_log.pack(run.log_path, self.pending_dir / f"{run.job_id}.log.gz")
        except OSError as err:
            log.warning("job %s: cannot pack its log %s: %s", run.label, run.log_path, err)
            return record
        return {**record, "log": str(path), "log_sha256": sha256}

    def hand_in_log(self, run: TrainerRun) -> None:
        """Send the attempt's log now, for an attempt that ends without a result (cancelled, released)."""
        record = self._with_log({"job_id": run.job_id, "lease": run.lease, "label": run.label}, run)
        packed = record.get("log")
        if packed:
            self._send_log(record)
            Path(packed).unlink(missing_ok=True)

    def deliver(self, record: dict) -> str:
        """Write the result to disk first, then send it; flush_pending leaves it alone meanwhile."""
        with self._lock:
            self._sending.add(record["job_id"])
        try:
            self._save_record(record)
            return self._send(record)
        finally:
            with self._lock:
                self._sending.discard(record["job_id"])

    def _record_path(self, job_id: str) -> Path:
        return self.pending_dir / f"{job_id}.json"

    def _save_record(self, record: dict) -> None:
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        path = self._record_path(record["job_id"])
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _drop_record(self, record: dict) -> None:
        for p in (self._record_path(record["job_id"]), record.get("bundle"), record.get("log"),
                  record.get("checkpoint")):
            if p:
                Path(p).unlink(missing_ok=True)

    def _send_log(self, record: dict) -> bool:
        """Hand in the record's log, if it has one still to send; False while no coordinator answers.

        Any other error drops the log (a result must not wait for it); a 409 will refuse the result too."""
        if not record.get("log"):
            return True
        label = record.get("label") or record["job_id"][:12]
        try:
            answer = self.client.upload_log(record["job_id"], record.get("lease"), record["log"],
                                            sha256=record["log_sha256"])
        except errors.Unavailable:
            return False
        except (errors.FleetError, OSError) as err:
            log.warning("job %s: its log was not handed in: %s", label, err)
        else:
            log.info("job %s: log of attempt %s handed in (%d bytes)", label, answer.get("attempt"),
                     answer.get("size") or 0)
        Path(record.pop("log")).unlink(missing_ok=True)
        if self._record_path(record["job_id"]).exists():
            self._save_record(record)
        return True

    def _send_checkpoint(self, record: dict) -> bool:
        """Hand in the checkpoint kept with the record (a self-fenced attempt's), like ``_send_log``: False
        while no coordinator answers; any other error drops it (the result must not wait for it)."""
        if not record.get("checkpoint"):
            return True
        label = record.get("label") or record["job_id"][:12]
        try:
            answer = self.client.upload_checkpoint(record["job_id"], record.get("lease"), record["checkpoint"],
                                                   sha256=record["checkpoint_sha256"],
                                                   epoch=record.get("checkpoint_epoch"))
        except errors.Unavailable:
            return False
        except (errors.FleetError, OSError) as err:
            log.warning("job %s: its checkpoint was not handed in: %s", label, err)
        else:
            log.info("job %s: checkpoint of attempt %s handed in (epoch %s)", label, answer.get("attempt"),
                     answer.get("epoch"))
        Path(record.pop("checkpoint")).unlink(missing_ok=True)
        if self._record_path(record["job_id"]).exists():
            self._save_record(record)
        return True

    def _send(self, record: dict) -> str:
        """Deliver one result. Unavailable keeps it on disk for later; a 409 drops it."""
        label = record.get("label") or record["job_id"][:12]
        job_id, lease = record["job_id"], record.get("lease")
        if not (self._send_checkpoint(record) and self._send_log(record)):
            log.warning("job %s: result kept in %s until the coordinator answers", label, self.pending_dir)
            return PENDING
        if record["action"] == "fail":
            try:
                answer = self.client.fail(job_id, lease, record["error"], record.get("class")) or {}
            except errors.Unavailable as err:
                log.warning("job %s: failure kept in %s until the coordinator answers (%s)",
                            label, self.pending_dir, err)
                return PENDING
            except (errors.StaleLease, errors.InvalidTransition, errors.NotFound) as err:
                log.warning("job %s: failure not recorded: %s", label, err)
            else:
                retry_at = answer.get("retry_at")
                if answer.get("status") == "pending" and isinstance(retry_at, (int, float)):
                    with self._lock:
                        self._retry_at = max(self._retry_at, float(retry_at))
                    log.info("job %s: reported as failed; it may be retried", label)
                else:
                    log.info("job %s: reported as failed", label)
            self._drop_record(record)
            return FAILED

        last: Exception | None = None
        for attempt in range(1, self.upload_tries + 1):
            try:
                if not record.get("artifact_id"):
                    answer = self.client.upload(job_id, lease, record["bundle"], sha256=record.get("sha256"))
                    record["artifact_id"] = answer["artifact_id"]
                    self._save_record(record)
                self.client.complete(job_id, lease, record["artifact_id"], record.get("metrics"),
                                     record.get("progress"))
            except errors.Unavailable as err:
                log.warning("job %s: result kept in %s until the coordinator answers (%s)",
                            label, self.pending_dir, err)
                return PENDING
            except (errors.StaleLease, errors.InvalidTransition) as err:
                log.warning("job %s: result discarded: %s", label, err)
                self._drop_record(record)
                return LOST
            except errors.NotFound as err:
                last = err  # the artifact is gone on the coordinator: upload again
                record.pop("artifact_id", None)
            except (errors.FleetError, OSError) as err:
                last = err
                if isinstance(err, errors.TooLarge):
                    break
            else:
                log.info("job %s: completed, artifact %s", label, record["artifact_id"][:12])
                self._drop_record(record)
                return COMPLETED
            log.warning("job %s: upload try %d/%d failed: %s", label, attempt, self.upload_tries, last)
            if attempt < self.upload_tries and self.stopping.wait(self.backoff_s * 2 ** (attempt - 1)):
                return PENDING
        fail = {"action": "fail", "job_id": job_id, "lease": lease, "attempt": record.get("attempt"),
                "error": f"upload failed after {self.upload_tries} tries: {last}", "label": label,
                # A bundle over the fleet's size limit will be as big next time; anything else was the way there.
                "class": jobs.CLASS_JOB if isinstance(last, errors.TooLarge) else jobs.CLASS_INFRA}
        self._drop_record(record)
        self._save_record(fail)
        return self._send(fail)

    def pending_records(self) -> list[dict]:
        records = []
        for path in sorted(self.pending_dir.glob("*.json")):
            try:
                records.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as err:
                log.warning("ignoring unreadable pending result %s: %s", path, err)
        return records

    def flush_pending(self) -> bool:
        """Send results left on disk by an outage or an earlier run; True when something is still waiting."""
        if not self._pending_lock.acquire(blocking=False):
            return True
        try:
            waiting = False
            for record in self.pending_records():
                with self._lock:
                    if record.get("job_id") in self._sending:
                        continue
                if not self._record_path(record.get("job_id", "")).exists():
                    continue
                if record.get("action") == "complete" and not Path(record.get("bundle", "")).is_file():
                    log.warning("job %s: pending bundle %s is gone; dropping the result",
                                record.get("job_id", "?")[:12], record.get("bundle"))
                    self._drop_record(record)
                    continue
                if self._send(record) == PENDING:
                    waiting = True
                    break
            return waiting
        finally:
            self._pending_lock.release()


def final_metrics(run: TrainerRun) -> dict:
    """What the results table shows for this attempt: the numbers of the trainer's metrics.json, else those of
    its last progress line; {} when it reported neither."""
    path = Path(run.out) / "metrics.json"
    written = None
    try:
        if path.stat().st_size > METRICS_JSON_MAX:
            log.warning("%s is over %d bytes; the results table uses the last progress line", path, METRICS_JSON_MAX)
        else:
            written = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as err:
        log.warning("cannot read %s (%s); the results table uses the last progress line", path, err)
    return results.final_metrics(written, run.progress())
