"""One attempt's checkpoints on the worker: the checkpoint it resumes from, and handing its newest one in.

Before the trainer starts, the checkpoint the claim names (``resume``: the newest
of an earlier attempt, from any host) is downloaded, its sha256 checked, and
extracted with ``bundle.extract_bundle``'s safe extraction into ``resume/``, passed as
``CIS490_RESUME_FROM``. One that cannot be had or fails its check is not used: the
trainer starts from the beginning and the log says why (a damaged checkpoint must
not fail a job that can still be trained).

While the trainer runs it keeps its newest checkpoint in ``checkpoint/``
(``CIS490_CHECKPOINT_DIR``; names starting with "." are files being written).
A changed checkpoint is uploaded, by the worker's one upload thread (``uploads``, an
executor: heartbeats keep their time, and one thread keeps one connection), at most
once per ``checkpoint_every_s`` (the first one at once); a progress
line naming a checkpoint makes the worker look at once instead of at its next scan.
When the attempt ends without a result (SIGTERM, cancel, release, a failure, a
self-fence), ``hand_over`` uploads what the trainer saved last, before the worker
reports the end, while the lease still holds.
Never starts or stops the trainer (trainer_process.py) and never reports the attempt.
"""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

from cis490fleet import errors
from cis490fleet.worker_view import logger

log = logger(__name__)

DEFAULT_EVERY_S = 600.0
SCAN_S = 5.0  # how often an unannounced change is looked for


def _signature(folder: Path) -> tuple:
    """(name, size, mtime) of each finished file: changes whenever the trainer renames a new checkpoint in."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return ()
    out = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
            continue
        st = entry.stat(follow_symlinks=False)
        out.append((entry.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


class CheckpointSync:
    """The checkpoint side of one ``TrainerRun``: ``environment()`` before it starts, ``poll(now)`` while it
    runs, ``hand_over()`` once it ended without a result."""

    def __init__(self, client: Any, run: Any, now: float, uploads: Executor):
        self.client = client
        self.run = run
        self.uploads = uploads
        claim = run.claim
        self.resume: dict | None = claim.get("resume") if isinstance(claim.get("resume"), dict) else None
        every = claim.get("checkpoint_every_s")
        self.every_s = float(every) if isinstance(every, (int, float)) and every >= 0 else DEFAULT_EVERY_S
        self.dir = run.dir / "checkpoint"
        self.resume_dir = run.dir / "resume"
        self._sent: tuple = ()
        self._next_upload = now  # the first checkpoint goes at once
        self._next_scan = now
        self._announced: object = None
        self._lock = threading.Lock()  # one upload at a time
        self._pending: Future | None = None

    # -- before the trainer starts ----------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """``CIS490_CHECKPOINT_DIR``, and ``CIS490_RESUME_FROM`` when the claim's checkpoint was fetched and checked."""
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {"CIS490_CHECKPOINT_DIR": str(self.dir)}
        if self.resume is not None and self._fetch_resume():
            env["CIS490_RESUME_FROM"] = str(self.resume_dir)
        return env

    def _fetch_resume(self) -> bool:
        from cis490fleet import bundle

        sha, label = self.resume.get("sha256"), self.run.label
        where = f"the checkpoint of attempt {self.resume.get('attempt')} (epoch {self.resume.get('epoch')})"
        download = self.run.dir / "resume.bundle"
        try:
            self.client.download_checkpoint(sha, download)
            shutil.rmtree(self.resume_dir, ignore_errors=True)
            bundle.extract_bundle(download, self.resume_dir)
        except (errors.FleetError, OSError) as err:
            log.warning("job %s: not resuming from %s: %s; the trainer starts from the beginning", label, where, err)
            shutil.rmtree(self.resume_dir, ignore_errors=True)
            return False
        finally:
            download.unlink(missing_ok=True)
        log.info("job %s: resuming from %s, sha256 %s verified", label, where, str(sha)[:12])
        return True

    # -- while it runs ------------------------------------------------------------------------

    def poll(self, now: float, progress: dict | None) -> None:
        """Start a background upload when the newest checkpoint changed and one is due."""
        if self._pending is not None and not self._pending.done():
            return  # an announcement seen now still counts once the upload in flight is done
        announced = progress.get("checkpoint") if isinstance(progress, dict) else None
        fresh = announced is not None and progress != self._announced
        if fresh:
            self._announced = progress
        if now < self._next_upload or not (fresh or now >= self._next_scan):
            return
        self._next_scan = now + SCAN_S
        if _signature(self.dir) == self._sent:
            return
        self._next_upload = now + self.every_s
        try:
            self._pending = self.uploads.submit(self._upload, progress)
        except RuntimeError:  # the worker is shutting down; hand_over still sends the newest
            self._pending = None

    # -- once it ended without a result -----------------------------------------------------------

    def hand_over(self, progress: dict | None = None, keep_in: Path | None = None) -> dict:
        """Upload the newest checkpoint unless already sent; waits for an upload in flight first.

        With ``keep_in`` (the outbox's folder), a checkpoint that no coordinator answered for is kept there
        and returned as fields of the result record (``checkpoint``, ``checkpoint_sha256``,
        ``checkpoint_epoch``), which the outbox hands in before the result once one answers; else ``{}``."""
        if self._pending is not None:
            self._pending.result()
        return self._upload(progress if progress is not None else self.run.progress(), keep_in)

    def _upload(self, progress: dict | None, keep_in: Path | None = None) -> dict:
        from cis490fleet import bundle

        run = self.run
        epoch = progress.get("epoch") if isinstance(progress, dict) else None
        epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None
        with self._lock:
            signature = _signature(self.dir)
            if not signature or signature == self._sent:
                return {}
            staged = run.dir / "checkpoint-staged"
            try:
                self._stage(staged, signature)
                path, sha, size = bundle.make_bundle(staged, run.dir / "checkpoint-upload")
            except (errors.FleetError, OSError) as err:
                log.warning("job %s: checkpoint not bundled: %s", run.label, err)
                return {}
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            try:
                self.client.upload_checkpoint(run.job_id, run.lease, path, sha256=sha, epoch=epoch)
            except errors.Unavailable as err:
                if keep_in is None:
                    log.warning("job %s: checkpoint not uploaded: %s", run.label, err)
                    return {}
                kept = keep_in / f"{run.job_id}.checkpoint{''.join(path.suffixes)}"
                keep_in.mkdir(parents=True, exist_ok=True)
                os.replace(path, kept)
                log.info("job %s: checkpoint kept in %s until a coordinator answers", run.label, kept)
                return {"checkpoint": str(kept), "checkpoint_sha256": sha, "checkpoint_epoch": epoch}
            except (errors.FleetError, OSError) as err:
                log.warning("job %s: checkpoint not uploaded: %s", run.label, err)
                return {}
            finally:
                path.unlink(missing_ok=True)
            self._sent = signature
            log.info("job %s: checkpoint uploaded (epoch %s, %d bytes, sha256 %s)", run.label, epoch, size, sha[:12])
            return {}

    def _stage(self, staged: Path, signature: tuple) -> None:
        """A still copy of the finished files: hard links (a copy where links fail), so a checkpoint the
        trainer renames in meanwhile changes nothing in what is bundled."""
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for name, _, _ in signature:
            try:
                os.link(self.dir / name, staged / name)
            except OSError:
                shutil.copy2(self.dir / name, staged / name)
