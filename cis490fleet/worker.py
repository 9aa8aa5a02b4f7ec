"""The `work` daemon: one thread per slot claims a job, carries it to its end, and claims again.

The slots are the ones the coordinator's register answer lists (the manifest's
``[[hosts]]`` slots, else the worker's own count: one per GPU, one on a CPU-only
host). Each slot thread finishes any result
still waiting on disk, claim with a long-poll, spawn the trainer, keep its
lease while it runs, then hand the result to the outbox. The worker never decides a
job's fate on its own: a ``cancel`` or a 409 (the job went to another host) only
stops the trainer. Owners: trainer_process.py (the process), lease_keeper.py
(heartbeats, cancel), result_outbox.py (bundle, upload, complete or fail, results
kept on disk), worker_config.py (settings), worker_view.py (terminal), slots.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from cis490fleet import errors, job_inputs, jobs, lease_keeper
from cis490fleet.checkpoint_sync import CheckpointSync
from cis490fleet.lease_keeper import FENCED, LeaseKeeper
from cis490fleet.model import normalize_capability
from cis490fleet.progress import changed_enough, progress_line
from cis490fleet.result_outbox import Outbox
from cis490fleet.slots import (CANCELLED, IDLE, LOST, PENDING, RELEASED, UNAVAILABLE, Slot, plan_slots,
                               slots_from_plan)
from cis490fleet.trainer_process import TrainerRun, kill_orphans, signal_name
from cis490fleet.worker_config import WorkerConfig, build_config, parse_args
from cis490fleet.worker_view import ProgressView, is_tty, logger, show

log = logger(__name__)


class Worker:
    """The worker daemon. ``start()`` then ``run()``; tests step it with ``run_once()``."""

    def __init__(self, config: WorkerConfig, client: Any = None, *,
                 detect: Callable[..., dict] | None = None, clock: Callable[[], float] = time.time):
        self.config = config
        self.client = client if client is not None else self._make_client()
        self._detect = detect
        self.clock = clock
        self.work_dir = config.work_dir
        self.capability: dict = {}
        self.slots: list[Slot] = []
        self._own_slots = 1  # this host's own count (config, else one per GPU), sent in the capability
        self._retired: set[int] = set()  # slots whose thread ended because a registration removed them
        self.runs: dict[int, TrainerRun] = {}
        self._stopping = threading.Event()
        self.outbox = Outbox(self.client, self.work_dir / "pending", self._stopping)
        # One thread uploads every slot's checkpoints: its one kept-alive connection serves them all.
        self.checkpoint_uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._last_busy = self.clock()
        self._lock = threading.Lock()
        self._registered = False

    def _make_client(self):
        from cis490fleet.client import Client

        c = self.config
        return Client(list(c.receivers), host_id=c.host_id, ca=c.ca, cert=c.cert, key=c.key, host_key=c.host_key)

    # -- start-up ---------------------------------------------------------------------------

    def detect_capability(self) -> dict:
        """Probe this host; slots are planned on the first call only (running threads keep theirs)."""
        detect = self._detect
        if detect is None:
            from cis490fleet import capability

            detect = capability.detect
        overrides = dict(self.config.capability)
        overrides["host"] = self.config.host_id
        cap = normalize_capability(detect(overrides, work_dir=str(self.work_dir)))
        if not self.slots:
            self.slots = plan_slots(cap, self.config.slots)
            self._own_slots = len(self.slots)
        else:
            cap = self._within_planned_gpus(cap)
        cap["slots"] = self._own_slots
        cap["host"] = self.config.host_id
        self.capability = cap
        log.info("capability: %d slot(s) %s; cuda=%s, %d cores, %.1f GiB RAM", len(self.slots),
                 [s.gpu or "cpu" for s in self.slots], cap["cuda"], cap["cores"], cap["ram_gib"])
        return cap

    def _within_planned_gpus(self, cap: dict) -> dict:
        """A re-detection advertises only the GPUs the running slots were given at start.

        Slot threads keep the device they were planned with, so a GPU that appeared
        since then would never be visible to a trainer: offering CUDA work for it
        would start jobs on a slot without a GPU.
        """
        planned = {s.gpu for s in self.slots if s.gpu}
        seen = {str(g.get("index", i)) for i, g in enumerate(cap["gpus"])} if cap["cuda"] else set()
        if seen == planned:
            return cap
        log.warning("GPUs changed since start (planned %s, now %s); restart the worker to plan its slots again",
                    sorted(planned) or "none", sorted(seen) or "none")
        cap["gpus"] = [g for i, g in enumerate(cap["gpus"]) if str(g.get("index", i)) in planned]
        cap["cuda"] = bool(cap["gpus"])
        cap["vram_gib"] = max((float(g.get("vram_gib") or 0) for g in cap["gpus"]), default=0.0)
        return cap

    def register(self) -> bool:
        """Announce this host; the answer's slots (the manifest's [[hosts]] slots, else ours) are the ones
        this worker runs from then on."""
        try:
            answer = self.client.register(self.capability)
        except errors.Unavailable as err:
            log.warning("cannot register yet: %s", err)
            return False
        self._registered = True
        log.info("registered as %s with %s", self.config.host_id, ", ".join(self.config.receivers))
        slots = slots_from_plan(answer.get("slots") if isinstance(answer, dict) else None)
        if slots is not None:
            with self._lock:
                self.slots = slots
            log.info("the coordinator runs %d slot(s) here: %s", len(slots), [s.gpu or "cpu" for s in slots])
        return True

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.outbox.pending_dir.mkdir(parents=True, exist_ok=True)
        if os.name != "nt":
            kill_orphans(self.work_dir)
        self.detect_capability()
        self.register()
        self.outbox.flush_pending()

    def stop(self) -> None:
        """Ask every loop to end: no new claims; running trainers are stopped and their jobs released."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- one step ---------------------------------------------------------------------------

    def run_once(self, slot: Slot | None = None, wait: float | None = None) -> str:
        """Finish waiting results, then claim one job for ``slot`` and carry it to its end."""
        slot = slot or (self.slots[0] if self.slots else Slot(0, ""))
        self.outbox.flush_pending()
        if self.stopping:
            return RELEASED
        if not self._registered and not self.register():
            return UNAVAILABLE
        claim_sent = time.monotonic()  # the lease is proven from here until a heartbeat is acknowledged
        try:
            claim = self.client.claim(self.capability, wait=self.config.wait_s if wait is None else wait,
                                      slot=self._slot_claim(slot))
        except errors.Unavailable as err:
            log.warning("claim: %s", err)
            return UNAVAILABLE
        if not claim or not claim.get("job_id"):
            return IDLE
        if isinstance(claim.get("slots"), int) and claim["slots"] != len(self.slots):
            log.info("the coordinator now counts %d slot(s) here (a manifest reload); registering again",
                     claim["slots"])
            self.register()
        run = TrainerRun(claim, slot, self.work_dir, self.clock())
        if self.stopping:
            self._release(run)
            return RELEASED
        with self._lock:
            self.runs[slot.index] = run
            self._last_busy = self.clock()
        try:
            return self._carry(run, claim_sent)
        finally:
            with self._lock:
                self.runs.pop(slot.index, None)
                self._last_busy = self.clock()

    def _slot_claim(self, slot: Slot) -> dict:
        """The claim's slot: its index and GPUs, each with the free VRAM the driver reports now."""
        gpus = [int(g) for g in slot.gpu.split(",") if g]
        free = self._free_vram() if gpus else {}
        return {"index": slot.index,
                "gpus": [{"index": g, **({"free_vram_gib": free[g]} if g in free else {})} for g in gpus]}

    def _free_vram(self) -> dict[int, float]:
        from cis490fleet import capability

        return capability.free_vram()

    def _carry(self, run: TrainerRun, claim_sent: float) -> str:
        log.info("job %s: claimed attempt %d on slot %d", run.label, run.attempt, run.slot.index)
        checkpoints = CheckpointSync(self.client, run, self.clock(), self.checkpoint_uploads)
        keeper = LeaseKeeper(self.client, run, self.config.grace_s, claim_sent)
        keeper.start()
        try:
            # A long-polled claim was sent long before the job was given: start the trainer once a
            # heartbeat has proven the lease afresh (or after one period, from the claim's send time).
            keeper.wait_first(run.heartbeat_s)
            try:
                run.inputs = job_inputs.fetch(self.client, run)
                run.spawn(checkpoints.environment())
            except job_inputs.MissingInput as err:
                return self.outbox.report_failure(run, str(err), jobs.CLASS_USAGE)
            except (errors.FleetError, OSError) as err:
                return self.outbox.report_failure(run, str(err), jobs.CLASS_INFRA)
            code = self._watch_trainer(run, keeper, checkpoints)
        finally:
            keeper.stop()
        if isinstance(code, str):
            return code
        if code != 0:
            checkpoints.hand_over()
            tail = run.stderr_tail()
            how = signal_name(code)
            log.warning("job %s: trainer ended with %s", run.label, how)
            failure_class = jobs.CLASS_SIGNAL if code < 0 else jobs.CLASS_USAGE if code == 2 else jobs.CLASS_JOB
            return self.outbox.report_failure(
                run, f"trainer {how}" + (f"; last stderr:\n{tail}" if tail.strip() else ""), failure_class)
        run.wait_for_output()
        return self.outbox.finish(run)

    def _watch_trainer(self, run: TrainerRun, keeper: LeaseKeeper, checkpoints: CheckpointSync) -> int | str:
        """Wait for the trainer to exit (its return code), or stop it and say how the attempt ended (an outcome).

        Every stop but a lost lease hands the trainer's last checkpoint in before the end is reported."""
        shown = None
        while (code := run.poll()) is None:
            if self.stopping:
                run.stop(self.config.grace_s)
                checkpoints.hand_over()
                self.outbox.hand_in_log(run)
                self._release(run)
                return RELEASED
            now = time.monotonic()
            verdict = keeper.verdict(now)
            if verdict == FENCED:
                silent = keeper.unproven_for(now)
                log.warning("job %s: no heartbeat acknowledged for %.0f s; stopping the trainer before the "
                            "coordinator may give the job to another host", run.label, silent)
                run.stop(keeper.grace_s)
                kept = checkpoints.hand_over(keep_in=self.outbox.pending_dir)
                # Kept on disk and sent when the coordinator answers again, the checkpoint first (taken
                # while the job waits unclaimed); if the job has gone to another host by then, the
                # coordinator refuses both and the record is dropped.
                return self.outbox.report_failure(run, f"stopped by its worker: no heartbeat acknowledged for "
                                                       f"{silent:.0f} s", jobs.CLASS_FENCED, kept)
            if verdict is not None:
                run.stop(self.config.grace_s)
                if verdict == lease_keeper.CANCELLED:  # a cancelled job's holder still hands in what it saved
                    checkpoints.hand_over()
                    self.outbox.hand_in_log(run)
                    return CANCELLED
                return LOST
            over = run.over_limit(now)
            if over is not None:
                failure_class, error = over
                log.warning("job %s: %s; stopping the trainer", run.label, error)
                run.stop(self.config.grace_s)
                checkpoints.hand_over()
                return self.outbox.report_failure(run, error, failure_class)
            checkpoints.poll(self.clock(), run.progress())
            if not is_tty() and changed_enough(shown, keeper.progress):
                log.info("job %s", progress_line(run.label, keeper.progress, run.started, self.clock(), tty=False))
                shown = keeper.progress
            self._stopping.wait(0.1)
        return code

    def _release(self, run: TrainerRun) -> None:
        try:
            self.client.release(run.job_id, run.lease)
            log.info("job %s: released", run.label)
        except errors.FleetError as err:
            log.warning("job %s: release failed (%s); the coordinator's stale sweep will take it back",
                        run.label, err)

    # -- the loop ---------------------------------------------------------------------------

    def _slot_loop(self, slot: Slot) -> None:
        delay = 0.5
        settled = False  # --once: the queue was settled before the latest claim
        while not self.stopping:
            with self._lock:
                if slot.index >= len(self.slots):
                    log.info("slot %d: no longer one of this host's slots; it stops", slot.index)
                    self._retired.add(slot.index)
                    return
                slot = self.slots[slot.index]
            try:
                outcome = self.run_once(slot)
            except errors.FleetError as err:  # the coordinator refused us (403, 400...): it says why
                log.warning("slot %d: %s", slot.index, err)
                outcome = UNAVAILABLE
            except Exception:  # a bug must not silently kill a slot
                log.exception("slot %d: unexpected error", slot.index)
                outcome = UNAVAILABLE
            if outcome == IDLE and self.config.once:
                # Exit only when a claim made after the queue settled found nothing: a job that
                # went stale between the empty claim and the check is pending again by then.
                if settled:
                    return
                settled = self.queue_settled()
                if not settled:
                    self._stopping.wait(0.5 if self.config.wait_s < 0.5 else 0)
                continue
            settled = False
            if outcome in (UNAVAILABLE, PENDING):
                self._stopping.wait(delay)
                delay = min(delay * 2, 30.0)
            else:
                delay = 0.5

    def queue_settled(self) -> bool:
        """For --once: nothing for us now, and nothing that may come back to the queue later.

        A job held anywhere may be released, go stale or unblock its dependents; a job
        of ours that failed may be retried after its backoff.
        """
        with self._lock:
            if self.runs or self.clock() < self.outbox.retry_at:
                return False
        try:
            return all(self.client.jobs(status=s, limit=1).get("total", 1) == 0 for s in ("claimed", "running"))
        except errors.FleetError as err:
            log.warning("cannot list held jobs: %s", err)
            return False

    def idle_for(self) -> float:
        with self._lock:
            return 0.0 if self.runs else self.clock() - self._last_busy

    def run(self) -> int:
        """Run every slot until stopped (or idle with --once / --exit-when-idle); returns the exit code."""
        self.start()
        threads: list[threading.Thread] = []
        self._start_slots(threads)
        view = ProgressView(sys.stdout) if is_tty() else None
        show(view)
        idle_limit = self.config.exit_when_idle_s
        while not self.stopping:
            self._start_slots(threads)
            if not any(t.is_alive() for t in threads):
                break
            if idle_limit is not None and self.idle_for() >= idle_limit:
                log.info("idle for %.0fs; exiting", idle_limit)
                break
            if view:
                with self._lock:
                    runs = list(self.runs.values())
                view.draw(runs, self.clock())
            self._stopping.wait(0.5)
        self._stopping.set()
        deadline = time.monotonic() + self.config.grace_s + 5
        for t in threads:
            # A slot blocked in a claim long-poll is abandoned: it holds no trainer.
            while t.is_alive() and time.monotonic() < deadline and self._slot_busy(t):
                t.join(timeout=0.2)
        if view:
            view.close()
            show(None)
        self._leave()
        log.info("worker %s stopped", self.config.host_id)
        return 0

    def _leave(self) -> None:
        """Tell the coordinator this worker is gone, so `jobs workers` says so now, not after worker_timeout_s."""
        try:
            self.client.leave()
        except errors.FleetError as err:
            log.warning("could not tell the coordinator that this worker is leaving (%s); it shows the worker as "
                        "gone once worker_timeout_s has passed", err)

    def _start_slots(self, threads: list[threading.Thread]) -> None:
        """A thread for each slot that has none: a later registration may add slots, or bring back one
        whose thread ended when an earlier registration removed it (``threads[i]`` runs slot i)."""
        with self._lock:
            slots = list(self.slots)
            back = [i for i in self._retired if i < len(slots) and i < len(threads)]
            self._retired.difference_update(back)
        for slot in slots:
            if slot.index < len(threads) and slot.index not in back:
                continue
            t = threading.Thread(target=self._slot_loop, args=(slot,), name=f"slot-{slot.index}", daemon=True)
            if slot.index < len(threads):
                threads[slot.index].join()
                threads[slot.index] = t
            else:
                threads.append(t)
            t.start()

    def _slot_busy(self, thread: threading.Thread) -> bool:
        index = int(thread.name.split("-")[1])
        with self._lock:
            return index in self.runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    config = build_config(args, dict(os.environ))
    worker = Worker(config)

    def on_stop(signum, _frame):
        log.info("%s: stopping trainers and releasing their jobs", signal.Signals(signum).name)
        worker.stop()

    def on_hup(_signum, _frame):
        threading.Thread(target=_redetect, args=(worker,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    return worker.run()


def _redetect(worker: Worker) -> None:
    log.info("SIGHUP: detecting capability again")
    try:
        worker.detect_capability()
        worker.register()
    except errors.FleetError as err:
        log.warning("capability refresh failed: %s", err)


