"""One attempt's trainer process: its folder, argv and environment, process group, train.log and progress.

Starts and stops the process and reads what it wrote; never talks to the coordinator
(lease_keeper.py keeps the lease, result_outbox.py delivers the result).

Layout under the work folder::

    <job_id>/attempt-N/train.log       trainer stdout + stderr
    <job_id>/attempt-N/progress.jsonl  CIS490_PROGRESS: one JSON object per line
    <job_id>/attempt-N/out/            CIS490_OUT, bundled on exit 0
    <job_id>/attempt-N/trainer.pid     while it runs (kill_orphans reads it after a crash)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from cis490fleet import errors, jobs
from cis490fleet.model import TrainerConfig, canonical_json
from cis490fleet.slots import Slot, visible_devices
from cis490fleet.worker_view import logger

log = logger(__name__)

TAIL_BYTES = 4096
LOG_LINE_MAX = 1 << 16
PLACEHOLDER_RE = re.compile(r"\{(python|model|mode|hyper|seed|split_recipe|train_hosts|out|inputs"
                            r"|input\.[A-Za-z0-9][A-Za-z0-9._-]{0,127})\}")


def fill_command(template: list[str], values: dict[str, str]) -> list[str]:
    """The trainer argv: each known ``{placeholder}`` replaced; other braces (JSON) left alone."""
    return [PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], str(arg)) for arg in template]


def signal_name(returncode: int) -> str:
    """How a trainer ended, in words: 'exit code 3' or 'killed by SIGKILL'."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def from_line_start(data: bytes, cut: bool) -> bytes:
    """``data``, the last bytes of a longer text when ``cut``, from its first whole line on: a tail that begins
    mid-line (or mid-character) misleads whoever reads it. A tail without any line break stays as it is."""
    if not cut:
        return data
    start = data.find(b"\n") + 1
    return data[start:] if 0 < start < len(data) else data


def read_tail(path: Path, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a log at most, from a line start."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return from_line_start(f.read(), size > limit).decode("utf-8", "replace")
    except OSError:
        return ""


def read_progress(path: Path) -> dict | None:
    """The trainer's latest complete progress line (a JSON object), or None."""
    for line in reversed(read_tail(path, 16384).splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def package_root() -> str:
    """The folder (or .pyz) that holds the cis490fleet package, so `{python} -m cis490fleet` works in trainers."""
    import cis490fleet

    return str(Path(cis490fleet.__file__).resolve().parent.parent)


class TrainerRun:
    """One attempt of one job: the trainer process, its folder, log and progress."""

    def __init__(self, claim: dict, slot: Slot, work_dir: Path, now: float):
        self.claim = claim
        self.job_id: str = claim["job_id"]
        self.lease: str | None = claim.get("lease")
        self.attempt: int = int(claim.get("attempt") or 1)
        self.spec: dict = claim.get("job") or {}
        self.heartbeat_s = float(claim.get("heartbeat_s") or 30.0)
        self.stale_after_s = float(claim.get("stale_after_s") or 600.0)
        self.max_runtime_s: float | None = claim.get("max_runtime_s")
        self.stall_after_s: float | None = claim.get("stall_after_s")
        self.trainer: dict = claim.get("trainer") or {}
        self.slot = slot
        self.devices = visible_devices(claim, slot)
        self.dir = work_dir / self.job_id / f"attempt-{self.attempt}"
        self.out = self.dir / "out"
        self.log_path = self.dir / "train.log"
        self.progress_path = self.dir / "progress.jsonl"
        self.pid_path = self.dir / "trainer.pid"
        self.inputs: dict[str, Path] = {}  # dependency name -> its extracted bundle (job_inputs.fetch)
        self.started = now
        self.proc: subprocess.Popen | None = None
        self._stderr_tail: deque[bytes] = deque()
        self._stderr_len = 0
        self._readers: list[threading.Thread] = []
        self._spawned = 0.0  # monotonic
        self._progress_seen = (-1, 0.0)  # (size of progress.jsonl, monotonic time it last changed)

    @property
    def label(self) -> str:
        name = self.spec.get("name") or f"{self.spec.get('model', '?')}/{self.spec.get('mode', '?')}"
        return f"{self.job_id[:12]} ({name})"

    def command(self) -> list[str]:
        template = self.trainer.get("command") or list(TrainerConfig().command)
        spec = self.spec
        return fill_command(template, {
            "python": sys.executable,
            "model": str(spec.get("model", "")),
            "mode": str(spec.get("mode", "")),
            "hyper": canonical_json(spec.get("hyper") or {}),
            "seed": str(spec.get("seed", 0)),
            "split_recipe": str(spec.get("split_recipe", "default")),
            "train_hosts": json.dumps(list(spec.get("train_hosts") or [])),
            "out": str(self.out),
            "inputs": str(self.dir / "inputs"),
            **{f"input.{name}": str(folder) for name, folder in self.inputs.items()},
        })

    def spawn(self, extra_env: dict[str, str] | None = None) -> None:
        """Start the trainer; ``extra_env`` adds to the contract's variables (the checkpoint folders)."""
        self.out.mkdir(parents=True, exist_ok=True)
        argv = self.command()
        env = dict(os.environ)
        env.pop("CIS490_RESUME_FROM", None)
        env["CIS490_INPUTS"] = str(self.dir / "inputs")
        env.update(extra_env or {})
        env.update({
            "CIS490_JOB_ID": self.job_id, "CIS490_ATTEMPT": str(self.attempt), "CIS490_OUT": str(self.out),
            "CIS490_PROGRESS": str(self.progress_path), "CUDA_VISIBLE_DEVICES": self.devices,
            "CIS490_GPUS": str(len([d for d in self.devices.split(",") if d])),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (package_root(), env.get("PYTHONPATH")) if p),
        })
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        try:
            self.proc = subprocess.Popen(argv, cwd=self.dir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        except OSError as err:
            raise errors.FleetError(f"cannot start the trainer {argv[0]!r}: {err.strerror or err}; "
                                    "check [trainer].command in the manifest") from None
        self._spawned = time.monotonic()
        self._progress_seen = (-1, self._spawned)
        self.pid_path.write_text(str(self.proc.pid))
        self._readers = [threading.Thread(target=self._pump, args=(stream, stream is self.proc.stderr),
                                          name=f"{name}-{self.job_id[:8]}", daemon=True)
                         for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))]
        for reader in self._readers:
            reader.start()
        log.info("job %s attempt %d: started trainer pid %d on slot %d (GPUs: %s): %s",
                 self.label, self.attempt, self.proc.pid, self.slot.index, self.devices or "none", " ".join(argv))

    def _pump(self, stream, is_stderr: bool) -> None:
        """Copy one of the trainer's streams into train.log a whole line at a time.

        An unbuffered Python trainer writes a line's text and its newline in two
        system calls; copying bytes as they arrive would splice the other
        stream's lines into the middle of this one's. Each stream appends through
        its own O_APPEND descriptor, so each write lands whole at the end.

        The stream is read to its end whatever happens to train.log: a full disk loses log lines
        (counted, said once), never stops the reading, which would block the trainer on a full pipe.
        """
        fd = stream.fileno()
        partial = b""
        lost = 0
        with open(self.log_path, "ab", buffering=0) as logf:
            while True:
                chunk = os.read(fd, 65536)
                if is_stderr and chunk:
                    self._keep_stderr(chunk)
                data = partial + chunk
                cut = data.rfind(b"\n") + 1 if chunk and len(data) < LOG_LINE_MAX else len(data)
                if cut:
                    try:
                        logf.write(data[:cut])
                    except OSError as err:
                        if not lost:
                            log.warning("job %s: cannot write %s (%s); dropping the trainer's output until it "
                                        "can (free space in the work folder)", self.label, self.log_path,
                                        err.strerror or err)
                        lost += cut
                partial = data[cut:]
                if not chunk:
                    break
        if lost:
            log.warning("job %s: %d bytes of the trainer's %s never reached %s", self.label, lost,
                        "stderr" if is_stderr else "stdout", self.log_path)
        stream.close()

    def _keep_stderr(self, chunk: bytes) -> None:
        self._stderr_tail.append(chunk)
        self._stderr_len += len(chunk)
        while self._stderr_len - len(self._stderr_tail[0]) >= TAIL_BYTES:
            self._stderr_len -= len(self._stderr_tail.popleft())

    def wait_for_output(self, timeout: float = 5.0) -> None:
        """Wait until everything the trainer wrote is in train.log (after it has exited)."""
        for reader in self._readers:
            reader.join(timeout=timeout)

    def stderr_tail(self) -> str:
        self.wait_for_output()
        data = b"".join(self._stderr_tail)
        return from_line_start(data[-TAIL_BYTES:], len(data) > TAIL_BYTES).decode("utf-8", "replace")

    def log_tail(self) -> str:
        return read_tail(self.log_path)

    def progress(self) -> dict | None:
        return read_progress(self.progress_path)

    def over_limit(self, now: float) -> tuple[str, str] | None:
        """(failure class, error) once the attempt ran past max_runtime_s or wrote no progress line for
        stall_after_s, else None; ``now`` is ``time.monotonic()``."""
        if self.max_runtime_s is not None and now - self._spawned > self.max_runtime_s:
            return jobs.CLASS_TIME_LIMIT, f"ran past its time limit of {self.max_runtime_s:g} s"
        if self.stall_after_s is not None:
            try:
                size = self.progress_path.stat().st_size
            except OSError:
                size = -1
            if size != self._progress_seen[0]:
                self._progress_seen = (size, now)
            elif now - self._progress_seen[1] > self.stall_after_s:
                return jobs.CLASS_STALLED, f"stalled: no progress for {self.stall_after_s:g} s"
        return None

    def poll(self) -> int | None:
        code = self.proc.poll() if self.proc else None
        if code is not None:
            self.pid_path.unlink(missing_ok=True)
        return code

    def _signal_group(self, sig: int) -> None:
        assert self.proc
        try:
            if os.name == "nt":
                if sig == signal.SIGTERM:
                    self.proc.send_signal(signal.CTRL_BREAK_EVENT)
                else:
                    self.proc.kill()
            else:
                os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM to the trainer's process group, SIGKILL after ``grace_s``; returns the exit status."""
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("job %s: trainer pid %d ignored SIGTERM for %.0fs; killing it",
                            self.label, self.proc.pid, grace_s)
        # The group may hold children that outlived the trainer; they go too.
        self._signal_group(signal.SIGKILL)
        code = self.proc.wait()
        self.pid_path.unlink(missing_ok=True)
        return code


def kill_orphans(work_dir: Path) -> int:
    """Kill trainers a killed worker left behind (their jobs go to others); returns how many.

    A pid is trusted only when /proc shows that process runs with that job's id in
    CIS490_JOB_ID, so a reused pid is never hit; elsewhere the pid file is only dropped.
    """
    killed = 0
    for pid_file in work_dir.glob("*/attempt-*/trainer.pid"):
        job_id = pid_file.parent.parent.name
        try:
            pid = int(pid_file.read_text().strip())
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except (OSError, ValueError):
            environ = b""
        if f"CIS490_JOB_ID={job_id}".encode() in environ.split(b"\0"):
            log.warning("killing trainer pid %d of job %s left by an earlier run of this worker", pid, job_id[:12])
            try:
                os.killpg(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        pid_file.unlink(missing_ok=True)
    return killed
