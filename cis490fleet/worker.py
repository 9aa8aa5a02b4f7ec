"""The `work` daemon: claims jobs, runs trainers in their own process groups, uploads their bundles.

One thread per slot (one slot per GPU, one on a CPU-only host) loops: finish any
result still waiting on disk, claim with a long-poll, spawn the trainer, heartbeat
while it runs, then bundle, upload and complete (or fail). A finished result is
written to ``<work>/pending/`` before it is sent, so a coordinator outage or a worker
restart loses no training. The worker never decides a job's fate on its own: a
``cancel`` or a 409 (the job went to another host) only stops the trainer.

Layout under the work folder::

    <job_id>/attempt-N/train.log       trainer stdout + stderr
    <job_id>/attempt-N/progress.jsonl  CIS490_PROGRESS: one JSON object per line
    <job_id>/attempt-N/out/            CIS490_OUT, bundled on exit 0
    pending/<job_id>.json + bundle     results not yet acknowledged by the coordinator
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cis490fleet import errors
from cis490fleet.model import HOST_ID_RE, TrainerConfig, canonical_json, normalize_capability
from cis490fleet.progress import changed_enough, progress_line, redraw, terminal_columns

TAIL_BYTES = 4096
LOG_LINE_MAX = 1 << 16
DEFAULT_CONFIG = (Path(os.environ.get("ProgramData", r"C:\ProgramData")) / "cis490fleet" / "worker.toml"
                  if os.name == "nt" else Path("/etc/cis490fleet/worker.toml"))
CONFIG_KEYS = ("receiver", "host_id", "work_dir", "slots", "grace_s", "wait_s", "ca", "cert", "key", "capability")
PLACEHOLDER_RE = re.compile(r"\{(python|model|mode|hyper|seed|split_recipe|train_hosts|out)\}")

# Outcomes of one slot step (Worker.run_once).
IDLE = "idle"                # nothing eligible for us
COMPLETED = "completed"      # uploaded and completed
FAILED = "failed"            # reported as failed
CANCELLED = "cancelled"      # the operator cancelled it; trainer stopped
LOST = "lost"                # 409: another attempt owns the job now; trainer stopped
RELEASED = "released"        # we are shutting down; job handed back
PENDING = "pending"          # result kept on disk until the coordinator answers
UNAVAILABLE = "unavailable"  # no coordinator answered the claim


class ProgressView:
    """One redrawn line per running job on a terminal, kept below the log lines.

    Worker log calls go through ``log`` (a ``_ViewSafeLog``), which lifts the block
    off the terminal before a record is written and puts it back after, so no log
    line is ever overwritten.
    """

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.RLock()
        self.shown: list[str] = []

    def draw(self, runs: list[TrainerRun], now: float) -> None:
        columns = terminal_columns(self.stream)
        lines = [progress_line(f"slot {run.slot.index} {run.label}", run.progress(), run.started, now, tty=True,
                               columns=columns) for run in sorted(runs, key=lambda r: r.slot.index)]
        with self.lock:
            self.clear()
            self.shown = lines
            self.put_back()

    def clear(self) -> None:
        with self.lock:
            if self.shown:
                self.stream.write(redraw([], len(self.shown)))
                self.stream.flush()

    def put_back(self) -> None:
        with self.lock:
            if self.shown:
                self.stream.write(redraw(self.shown, 0))
                self.stream.flush()

    def close(self) -> None:
        with self.lock:
            self.clear()
            self.shown = []


class _ViewSafeLog:
    """The module's logger, whose records never land inside the live progress block."""

    view: ProgressView | None = None

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def _emit(self, level: int, msg: str, *args, **kwargs) -> None:
        view = self.view
        if view is None:
            self.logger.log(level, msg, *args, stacklevel=3, **kwargs)
            return
        with view.lock:
            view.clear()
            try:
                self.logger.log(level, msg, *args, stacklevel=3, **kwargs)
            finally:
                view.put_back()

    def debug(self, msg, *args, **kw):
        self._emit(logging.DEBUG, msg, *args, **kw)

    def info(self, msg, *args, **kw):
        self._emit(logging.INFO, msg, *args, **kw)

    def warning(self, msg, *args, **kw):
        self._emit(logging.WARNING, msg, *args, **kw)

    def exception(self, msg, *args, **kw):
        self._emit(logging.ERROR, msg, *args, exc_info=True, **kw)


log = _ViewSafeLog(logging.getLogger(__name__))


def default_work_dir() -> Path:
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home()) / "cis490fleet" / "work"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "cis490fleet" / "work"


@dataclass(frozen=True)
class WorkerConfig:
    receivers: tuple[str, ...]
    host_id: str
    work_dir: Path
    slots: int | None = None  # None: one per GPU, else 1
    grace_s: float = 30.0
    wait_s: float = 20.0
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    capability: dict = field(default_factory=dict, hash=False)  # overrides of detected values
    once: bool = False
    exit_when_idle_s: float | None = None


def _bad(where: str, what: str) -> errors.ConfigError:
    return errors.ConfigError(f"{where}: {what}")


def read_config_file(path: Path) -> dict:
    """The worker.toml table, checked for unknown keys and types (values are checked in build_config)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise errors.ConfigError(f"{path}: no such file; pass --config with an existing worker.toml") from None
    except OSError as err:
        raise errors.ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise errors.ConfigError(f"{path}: not valid TOML ({err})") from None
    except UnicodeDecodeError as err:
        raise errors.ConfigError(f"{path}: not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8") from None
    for key in data:
        if key not in CONFIG_KEYS:
            near = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(CONFIG_KEYS)}"
            raise _bad(f"{path}: {key}", f"unknown key; {hint}")
    if "capability" in data and not isinstance(data["capability"], dict):
        raise _bad(f"{path}: capability", "expected a table ([capability])")
    return data


def _number(where: str, value: Any, *, minimum: float, integer: bool = False) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise _bad(where, f"expected {kind} >= {minimum:g}, got {value!r}")
    return value


def _receiver_list(where: str, value: Any) -> tuple[str, ...]:
    """The URLs as the client will use them (``client.parse_urls``); empty when ``value`` holds none."""
    from cis490fleet.client import parse_urls

    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(u, str) for u in items):
        raise _bad(where, f"expected a URL or a list of URLs, got {value!r}")
    if not any(u.strip() for item in items for u in item.split(",")):
        return ()
    try:
        return tuple(parse_urls(items))
    except errors.ConfigError as err:
        raise _bad(where, str(err)) from None


def build_config(args: argparse.Namespace, env: dict[str, str]) -> WorkerConfig:
    """Flags over the environment over the config file over defaults; every value checked here, once."""
    path = Path(args.config) if args.config else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    file = read_config_file(path) if path else {}
    src = str(path) if path else "worker.toml"

    receivers: tuple[str, ...] = ()
    if args.receiver:
        receivers = _receiver_list("--receiver", args.receiver)
    elif env.get("CIS490_RECEIVER"):
        receivers = _receiver_list("CIS490_RECEIVER", env["CIS490_RECEIVER"])
    elif "receiver" in file:
        receivers = _receiver_list(f"{src}: receiver", file["receiver"])
    if not receivers:
        raise errors.ConfigError("no coordinator URL: pass --receiver URL, set CIS490_RECEIVER, "
                                 "or set receiver in worker.toml")

    host_id = args.host_id or file.get("host_id") or socket.gethostname()
    if not isinstance(host_id, str) or not HOST_ID_RE.match(host_id):
        raise errors.ConfigError(f"host id {host_id!r} is not valid (letters, digits, '.', '_', '-', at most 63); "
                                 "pass --host-id or set host_id in worker.toml")

    work_dir = args.work_dir or file.get("work_dir") or default_work_dir()
    if not isinstance(work_dir, (str, Path)):
        raise _bad(f"{src}: work_dir", f"expected a path, got {work_dir!r}")

    slots = args.slots if args.slots is not None else file.get("slots")
    if slots is not None:
        slots = _number("--slots" if args.slots is not None else f"{src}: slots", slots, minimum=1, integer=True)
    grace = args.grace if args.grace is not None else file.get("grace_s", 30.0)
    grace = _number("--grace" if args.grace is not None else f"{src}: grace_s", grace, minimum=0)
    wait = args.wait if args.wait is not None else file.get("wait_s", 20.0)
    wait = _number("--wait" if args.wait is not None else f"{src}: wait_s", wait, minimum=0)
    if args.exit_when_idle is not None:
        _number("--exit-when-idle", args.exit_when_idle, minimum=0)

    tls = {}
    for name in ("ca", "cert", "key"):
        value = getattr(args, name) or file.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise _bad(f"{src}: {name}", f"expected a file path, got {value!r}")
            if not Path(value).is_file():
                raise errors.ConfigError(f"{name} file {value} does not exist; fix --{name} or {name} in worker.toml")
        tls[name] = value
    if bool(tls["cert"]) != bool(tls["key"]):
        raise errors.ConfigError("a client certificate needs both cert and key; give both or neither")

    return WorkerConfig(receivers=receivers, host_id=host_id, work_dir=Path(work_dir).expanduser().resolve(),
                        slots=slots, grace_s=float(grace), wait_s=float(wait),
                        capability=dict(file.get("capability", {})),
                        once=args.once, exit_when_idle_s=args.exit_when_idle, **tls)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cis490fleet work", description="Run the worker daemon on a training host.")
    p.add_argument("--config", help=f"worker.toml (default {DEFAULT_CONFIG} when it exists)")
    p.add_argument("--receiver", action="append", metavar="URL",
                   help="coordinator URL; repeat for several peers (env CIS490_RECEIVER, comma-separated)")
    p.add_argument("--host-id", help="this host's id (default: the host name)")
    p.add_argument("--work-dir", help=f"where trainers run and results wait (default {default_work_dir()})")
    p.add_argument("--slots", type=int, help="jobs at once (default: one per GPU, else 1)")
    p.add_argument("--ca", help="CA bundle that signed the coordinator's certificate")
    p.add_argument("--cert", help="this host's client certificate (mutual TLS)")
    p.add_argument("--key", help="the client certificate's private key")
    p.add_argument("--grace", type=float, help="seconds between SIGTERM and SIGKILL for a trainer (default 30)")
    p.add_argument("--wait", type=float, help="claim long-poll seconds (default 20)")
    p.add_argument("--once", action="store_true", help="exit when the queue has nothing for this host")
    p.add_argument("--exit-when-idle", type=float, metavar="S", help="exit after S seconds without a job")
    return p.parse_args(argv)


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


def read_tail(path: Path, limit: int = TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def read_progress(path: Path) -> dict | None:
    """The trainer's latest complete progress line (a JSON object), or None."""
    text = read_tail(path, 16384)
    for line in reversed(text.splitlines()[1 if len(text) >= 16384 else 0:]):
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


@dataclass(frozen=True)
class Slot:
    index: int
    gpu: str  # CUDA_VISIBLE_DEVICES for this slot; "" on CPU-only slots


def plan_slots(capability: dict, override: int | None) -> list[Slot]:
    """One slot per GPU (each with its own device), one on a CPU-only host; ``override`` sets the count."""
    gpus = []
    if capability.get("cuda"):
        gpus = [str(g.get("index", i)) for i, g in enumerate(capability.get("gpus") or [])]
    count = override or max(1, len(gpus))
    return [Slot(i, gpus[i % len(gpus)] if gpus else "") for i in range(count)]


class TrainerRun:
    """One attempt of one job: the trainer process, its folder, log and progress."""

    def __init__(self, claim: dict, slot: Slot, work_dir: Path, now: float):
        self.job_id: str = claim["job_id"]
        self.lease: str | None = claim.get("lease")
        self.attempt: int = int(claim.get("attempt") or 1)
        self.spec: dict = claim.get("job") or {}
        self.heartbeat_s = float(claim.get("heartbeat_s") or 30.0)
        self.trainer: dict = claim.get("trainer") or {}
        self.slot = slot
        self.dir = work_dir / self.job_id / f"attempt-{self.attempt}"
        self.out = self.dir / "out"
        self.log_path = self.dir / "train.log"
        self.progress_path = self.dir / "progress.jsonl"
        self.pid_path = self.dir / "trainer.pid"
        self.started = now
        self.proc: subprocess.Popen | None = None
        self._stderr_tail: deque[bytes] = deque()
        self._stderr_len = 0
        self._readers: list[threading.Thread] = []

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
        })

    def spawn(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        argv = self.command()
        env = dict(os.environ)
        env.update({
            "CIS490_JOB_ID": self.job_id, "CIS490_ATTEMPT": str(self.attempt), "CIS490_OUT": str(self.out),
            "CIS490_PROGRESS": str(self.progress_path), "CUDA_VISIBLE_DEVICES": self.slot.gpu,
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
        self.pid_path.write_text(str(self.proc.pid))
        self._readers = [threading.Thread(target=self._pump, args=(stream, stream is self.proc.stderr),
                                          name=f"{name}-{self.job_id[:8]}", daemon=True)
                         for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))]
        for reader in self._readers:
            reader.start()
        log.info("job %s attempt %d: started trainer pid %d on slot %d: %s",
                 self.label, self.attempt, self.proc.pid, self.slot.index, " ".join(argv))

    def _pump(self, stream, is_stderr: bool) -> None:
        """Copy one of the trainer's streams into train.log a whole line at a time.

        An unbuffered Python trainer writes a line's text and its newline in two
        system calls; copying bytes as they arrive would splice the other
        stream's lines into the middle of this one's. Each stream appends through
        its own O_APPEND descriptor, so each write lands whole at the end.
        """
        fd = stream.fileno()
        partial = b""
        with open(self.log_path, "ab", buffering=0) as logf:
            while True:
                chunk = os.read(fd, 65536)
                if is_stderr and chunk:
                    self._keep_stderr(chunk)
                data = partial + chunk
                cut = data.rfind(b"\n") + 1 if chunk and len(data) < LOG_LINE_MAX else len(data)
                if cut:
                    logf.write(data[:cut])
                partial = data[cut:]
                if not chunk:
                    break
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
        return b"".join(self._stderr_tail)[-TAIL_BYTES:].decode("utf-8", "replace")

    def log_tail(self) -> str:
        return read_tail(self.log_path)

    def progress(self) -> dict | None:
        return read_progress(self.progress_path)

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


class Worker:
    """The worker daemon. ``start()`` then ``run()``; tests step it with ``run_once()``."""

    def __init__(self, config: WorkerConfig, client: Any = None, *,
                 detect: Callable[..., dict] | None = None, clock: Callable[[], float] = time.time):
        self.config = config
        self.client = client if client is not None else self._make_client()
        self._detect = detect
        self.clock = clock
        self.work_dir = config.work_dir
        self.pending_dir = self.work_dir / "pending"
        self.capability: dict = {}
        self.slots: list[Slot] = []
        self.runs: dict[int, TrainerRun] = {}
        self.upload_tries = 4
        self.backoff_s = 1.0
        self._stopping = threading.Event()
        self._pending_lock = threading.Lock()
        self._sending: set[str] = set()
        self._last_busy = self.clock()
        self._lock = threading.Lock()
        self._registered = False
        self._retry_at = 0.0  # a job of ours failed and may come back at this time

    def _make_client(self):
        from cis490fleet.client import Client

        c = self.config
        return Client(list(c.receivers), host_id=c.host_id, ca=c.ca, cert=c.cert, key=c.key)

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
        else:
            cap = self._within_planned_gpus(cap)
        cap["slots"] = len(self.slots)
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
        try:
            self.client.register(self.capability)
        except errors.Unavailable as err:
            log.warning("cannot register yet: %s", err)
            return False
        self._registered = True
        log.info("registered as %s with %s", self.config.host_id, ", ".join(self.config.receivers))
        return True

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        if os.name != "nt":
            kill_orphans(self.work_dir)
        self.detect_capability()
        self.register()
        self.flush_pending()

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
        self.flush_pending()
        if self.stopping:
            return RELEASED
        if not self._registered and not self.register():
            return UNAVAILABLE
        try:
            claim = self.client.claim(self.capability, wait=self.config.wait_s if wait is None else wait)
        except errors.Unavailable as err:
            log.warning("claim: %s", err)
            return UNAVAILABLE
        if not claim or not claim.get("job_id"):
            return IDLE
        run = TrainerRun(claim, slot, self.work_dir, self.clock())
        if self.stopping:
            self._release(run)
            return RELEASED
        with self._lock:
            self.runs[slot.index] = run
            self._last_busy = self.clock()
        try:
            return self._carry(run)
        finally:
            with self._lock:
                self.runs.pop(slot.index, None)
                self._last_busy = self.clock()

    def _carry(self, run: TrainerRun) -> str:
        log.info("job %s: claimed attempt %d on slot %d", run.label, run.attempt, run.slot.index)
        try:
            run.spawn()
        except (errors.FleetError, OSError) as err:
            return self._report_failure(run, str(err))
        next_beat = 0.0
        warned = False
        shown = None
        while True:
            code = run.poll()
            if code is not None:
                break
            if self.stopping:
                run.stop(self.config.grace_s)
                self._release(run)
                return RELEASED
            now = self.clock()
            if now >= next_beat:
                next_beat = now + run.heartbeat_s
                progress = run.progress()
                try:
                    answer = self.client.heartbeat(run.job_id, run.lease, progress=progress, log_tail=run.log_tail())
                except errors.StaleLease as err:
                    log.warning("job %s: %s; stopping the trainer", run.label, err)
                    run.stop(self.config.grace_s)
                    return LOST
                except errors.InvalidTransition as err:
                    log.warning("job %s: %s; stopping the trainer", run.label, err)
                    run.stop(self.config.grace_s)
                    return CANCELLED
                except errors.FleetError as err:
                    if not warned:
                        log.warning("job %s: heartbeat failed (%s); the trainer keeps running", run.label, err)
                    warned = True
                else:
                    if warned:
                        log.info("job %s: the coordinator answers again", run.label)
                    warned = False
                    if answer and answer.get("cancel"):
                        log.info("job %s: cancelled by an operator; stopping the trainer", run.label)
                        run.stop(self.config.grace_s)
                        return CANCELLED
                if not _is_tty() and changed_enough(shown, progress):
                    log.info("job %s", progress_line(run.label, progress, run.started, now, tty=False))
                    shown = progress
            self._stopping.wait(0.1)
        if code != 0:
            tail = run.stderr_tail()
            how = signal_name(code)
            log.warning("job %s: trainer ended with %s", run.label, how)
            return self._report_failure(run, f"trainer {how}" + (f"; last stderr:\n{tail}" if tail.strip() else ""))
        run.wait_for_output()
        return self._finish(run)

    # -- results ----------------------------------------------------------------------------

    def _finish(self, run: TrainerRun) -> str:
        from cis490fleet import bundle

        try:
            path, sha256, size = bundle.make_bundle(run.out, self.pending_dir / run.job_id)
        except (OSError, errors.FleetError) as err:
            return self._report_failure(run, f"cannot bundle the trainer's output {run.out}: {err}")
        log.info("job %s: trainer done; bundle %s (%d bytes)", run.label, Path(path).name, size)
        record = {"action": "complete", "job_id": run.job_id, "lease": run.lease, "attempt": run.attempt,
                  "bundle": str(path), "sha256": sha256, "size": size, "label": run.label}
        return self._deliver(record)

    def _report_failure(self, run: TrainerRun, error: str) -> str:
        record = {"action": "fail", "job_id": run.job_id, "lease": run.lease, "attempt": run.attempt,
                  "error": error, "label": run.label}
        return self._deliver(record)

    def _deliver(self, record: dict) -> str:
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
        for p in (self._record_path(record["job_id"]), Path(record["bundle"]) if record.get("bundle") else None):
            if p is not None:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    def _send(self, record: dict) -> str:
        """Deliver one result. Unavailable keeps it on disk for later; a 409 drops it."""
        label = record.get("label") or record["job_id"][:12]
        job_id, lease = record["job_id"], record.get("lease")
        if record["action"] == "fail":
            try:
                answer = self.client.fail(job_id, lease, record["error"]) or {}
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
                self.client.complete(job_id, lease, record["artifact_id"])
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
            if attempt < self.upload_tries and self._stopping.wait(self.backoff_s * 2 ** (attempt - 1)):
                return PENDING
        fail = {"action": "fail", "job_id": job_id, "lease": lease, "attempt": record.get("attempt"),
                "error": f"upload failed after {self.upload_tries} tries: {last}", "label": label}
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
            if self.runs or self.clock() < self._retry_at:
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
        threads = [threading.Thread(target=self._slot_loop, args=(s,), name=f"slot-{s.index}", daemon=True)
                   for s in self.slots]
        for t in threads:
            t.start()
        view = ProgressView(sys.stdout) if _is_tty() else None
        log.view = view
        idle_limit = self.config.exit_when_idle_s
        while not self.stopping:
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
            log.view = None
        log.info("worker %s stopped", self.config.host_id)
        return 0

    def _slot_busy(self, thread: threading.Thread) -> bool:
        index = int(thread.name.split("-")[1])
        with self._lock:
            return index in self.runs


def _is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


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


