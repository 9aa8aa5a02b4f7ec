"""Data types shared by every layer: job specs, hosts, fleet settings, states and ids.

Pure core: no I/O, no clock reads. Instances are frozen and built only by
``manifest.parse`` (validation happens there, once) or by ``*.from_json`` on
data this program wrote itself.

Job id encoding (pinned by tests/test_model.py, never change it): the job id is
the lowercase hex sha256 of the UTF-8 bytes of ``canonical_json(identity)``
where ``identity`` is the JSON object with exactly the keys ``model``, ``mode``,
``hyper``, ``split_recipe``, ``train_hosts`` and ``seed``. ``canonical_json``:

- object keys sorted by code point, separators ``,`` and ``:``, no whitespace;
- strings as JSON with non-ASCII characters kept as UTF-8 (``ensure_ascii=False``);
- booleans ``true``/``false``; ``null``;
- a float with an integral value below 2**53 in magnitude is written as that
  integer (``10.0`` -> ``10``), so ``epochs = 10`` and ``epochs = 10.0`` name one
  job; any other float is written with Python's shortest round-trip ``repr``
  (``1e-3`` and ``0.001`` both parse to the same double and print ``0.001``),
  which is the same on every Python >= 3.1 and platform with IEEE doubles;
  NaN and infinities are refused;
- arrays keep their order (``train_hosts = ["a", "b"]`` differs from ``["b", "a"]``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

PENDING = "pending"
CLAIMED = "claimed"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
STOPPED = "stopped"  # stopped early: a sweep's stop rule found it worse than its peers (final; requeue resumes it)

STATUSES = (PENDING, CLAIMED, RUNNING, COMPLETED, FAILED, CANCELLED, STOPPED)
FINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, STOPPED})
HALTED_STATUSES = frozenset({CANCELLED, STOPPED})  # its holder keeps the lease only to be told to stop
HELD_STATUSES = frozenset({CLAIMED, RUNNING})

JOB_ID_RE = re.compile(r"^[0-9a-f]{64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
HOST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OPERATOR_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

IDENTITY_FIELDS = ("model", "mode", "hyper", "split_recipe", "train_hosts", "seed")


def _canonical(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"NaN and infinity have no canonical encoding (got {value!r})")
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
        return value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    raise TypeError(f"cannot encode {type(value).__name__} canonically")


def canonical_json(value: Any) -> str:
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _copy_plain(value: Any) -> Any:
    """A deep copy of dicts, lists and tuples of plain values (what dataclasses.asdict gives for them)."""
    if isinstance(value, dict):
        return {k: _copy_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_plain(v) for v in value)
    return value


def compute_job_id(model: str, mode: str, hyper: dict, split_recipe: str, train_hosts: tuple | list, seed: int) -> str:
    identity = {
        "model": model,
        "mode": mode,
        "hyper": hyper,
        "split_recipe": split_recipe,
        "train_hosts": list(train_hosts),
        "seed": seed,
    }
    return hashlib.sha256(canonical_json(identity).encode("utf-8")).hexdigest()


NOTIFY_EVENTS = ("failed", "completed", "sweep_done", "host_lost")
NOTIFY_FORMATS = ("json", "slack")


@dataclass(frozen=True)
class NotifyTarget:
    """One ``[[notify]]`` table: the URL the coordinator POSTs the named events to.

    ``secret_env`` names an environment variable of the coordinator that holds the HMAC key of the
    signature header, so the secret itself stays out of the manifest and the replicated log."""

    url: str
    on: tuple[str, ...] = ("failed", "sweep_done", "host_lost")
    format: str = "json"
    secret_env: str | None = None

    def to_json(self) -> dict:
        return {"url": self.url, "on": list(self.on), "format": self.format, "secret_env": self.secret_env}

    @classmethod
    def from_json(cls, d: dict) -> "NotifyTarget":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "on" in d:
            d["on"] = tuple(d["on"])
        return cls(**d)


@dataclass(frozen=True)
class FleetConfig:
    """The ``[fleet]`` table. Times in seconds, sizes in bytes."""

    name: str = "fleet"
    peers: tuple[tuple[str, str], ...] = ()  # (peer id, url), from [[fleet.peers]]
    stale_after_s: float = 600.0
    heartbeat_s: float = 30.0
    max_attempts: int = 3
    max_artifact_bytes: int = 64 * 2**30
    retry_backoff_s: float = 30.0
    worker_timeout_s: float = 120.0  # a worker unseen this long is not live
    checkpoint_every_s: float = 600.0  # a running job's newest checkpoint goes to the coordinator this often
    notify: tuple[NotifyTarget, ...] = ()  # from the top-level [[notify]] tables
    retries: int = 0  # tries after a failure that is the job's fault (a trainer's non-zero exit), for every job
    max_runtime_s: float | None = None  # an attempt running longer is stopped; None: no limit
    stall_after_s: float | None = None  # an attempt without a progress line this long is stopped; None: never

    def to_json(self) -> dict:
        d = asdict(self)
        d["peers"] = [list(p) for p in self.peers]
        d["notify"] = [n.to_json() for n in self.notify]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "FleetConfig":
        d = dict(d)
        d["peers"] = tuple(tuple(p) for p in d.get("peers", ()))
        d["notify"] = tuple(NotifyTarget.from_json(n) for n in d.get("notify", ()))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TrainerConfig:
    """The ``[trainer]`` table: how the worker runs a job.

    ``command`` is an argv list whose items may hold ``{model}``, ``{mode}``,
    ``{hyper}`` (JSON), ``{seed}``, ``{split_recipe}``, ``{train_hosts}`` (JSON),
    ``{out}`` and ``{python}`` (the worker's interpreter) placeholders.
    ``hyper_keys`` lists the accepted hyper keys per model (``"*"`` for all
    models); empty means unchecked. ``describe`` is an argv that prints that
    mapping as JSON, asked by ``manifest check --describe``.
    """

    command: tuple[str, ...] = ("{python}", "-m", "cis490fleet", "train", "--model", "{model}", "--mode", "{mode}",
                                "--hyper", "{hyper}", "--seed", "{seed}", "--split-recipe", "{split_recipe}",
                                "--out", "{out}")
    hyper_keys: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (model or "*", keys)
    describe: tuple[str, ...] = ()

    def accepted_keys(self, model: str) -> frozenset[str] | None:
        """The hyper keys the trainer accepts for ``model``; None when unchecked."""
        table = dict(self.hyper_keys)
        if model in table:
            return frozenset(table[model]) | frozenset(table.get("*", ()))
        if "*" in table:
            return frozenset(table["*"])
        return None

    def to_json(self) -> dict:
        return {"command": list(self.command), "hyper_keys": {m: list(k) for m, k in self.hyper_keys},
                "describe": list(self.describe)}

    @classmethod
    def from_json(cls, d: dict) -> "TrainerConfig":
        return cls(command=tuple(d.get("command", cls.command)),
                   hyper_keys=tuple((m, tuple(k)) for m, k in sorted(d.get("hyper_keys", {}).items())),
                   describe=tuple(d.get("describe", ())))


@dataclass(frozen=True)
class HostSpec:
    """A ``[[hosts]]`` entry: policy and capability overrides for one host id."""

    id: str
    allow_jobs: tuple[str, ...] = ("*",)  # globs over model names
    deny_jobs: tuple[str, ...] = ()
    slots: int | None = None  # None: from the worker's detected capability
    capability: dict = field(default_factory=dict, hash=False, compare=True)  # overrides, e.g. {"cuda": False}
    role: str = "worker"  # "worker", "coordinator" or "both": informational
    gpu_share: bool = False  # jobs may share one of its GPUs while their VRAM needs fit together
    speed: float | None = None  # relative to 1.0; None: learned from finished attempts, else 1.0

    def to_json(self) -> dict:
        return {"id": self.id, "allow_jobs": list(self.allow_jobs), "deny_jobs": list(self.deny_jobs),
                "slots": self.slots, "capability": dict(self.capability), "role": self.role,
                "gpu_share": self.gpu_share, "speed": self.speed}

    @classmethod
    def from_json(cls, d: dict) -> "HostSpec":
        return cls(id=d["id"], allow_jobs=tuple(d.get("allow_jobs", ("*",))), deny_jobs=tuple(d.get("deny_jobs", ())),
                   slots=d.get("slots"), capability=dict(d.get("capability", {})), role=d.get("role", "worker"),
                   gpu_share=bool(d.get("gpu_share", False)), speed=d.get("speed"))


@dataclass(frozen=True)
class JobSpec:
    """One training job. Identity fields make the id; the rest are constraints and scheduling."""

    model: str
    mode: str
    hyper: dict = field(default_factory=dict, hash=False)
    split_recipe: str = "default"
    train_hosts: tuple[str, ...] = ()
    seed: int = 0
    require_cuda: bool = False
    prefer_cuda: bool = False
    min_vram_gib: float = 0.0
    min_ram_gib: float = 0.0
    allowed_hosts: tuple[str, ...] = ()  # empty: any host
    priority: int = 0
    retries: int | None = None  # None: fleet.retries for the job's faults, fleet.max_attempts tries in all
    name: str | None = None
    after: tuple[str, ...] = ()  # names of jobs that must complete first
    gpus: int = 0  # N >= 1: N GPUs of one host (CUDA_VISIBLE_DEVICES lists them); 0: the slot's GPU if it fits
    gpu_share: bool = False  # may share a GPU with other sharing jobs while their VRAM needs fit together
    mixed_gpus: bool = False  # with gpus > 1: GPUs of different models will do
    expected_minutes: float | None = None  # on a host of speed 1.0; None: learned from earlier runs
    checkpoint_every_s: float | None = None  # None: the fleet's
    sweep: str | None = None  # the [[sweeps]] entry it came from: its name, else "sweeps[<index>]"
    max_runtime_s: float | None = None  # None: fleet.max_runtime_s
    stall_after_s: float | None = None  # None: fleet.stall_after_s
    stop: dict | None = field(default=None, hash=False)  # a sweep's early-stopping rule (stop_rules.py)

    @property
    def id(self) -> str:
        return compute_job_id(self.model, self.mode, self.hyper, self.split_recipe, self.train_hosts, self.seed)

    def max_attempts(self, fleet: FleetConfig) -> int:
        return fleet.max_attempts if self.retries is None else self.retries + 1

    def fault_tries(self, fleet: FleetConfig) -> int:
        """Tries the job may use on failures that are its own fault (see ``jobs.tries_for``)."""
        return (fleet.retries if self.retries is None else self.retries) + 1

    def constraint_key(self) -> str:
        """Jobs with equal keys are eligible for exactly the same hosts and GPUs (dependencies aside).

        The GPU fields join the key only when set, so the keys of jobs without them stay as they were.
        """
        key = {
            "model": self.model, "require_cuda": self.require_cuda, "prefer_cuda": self.prefer_cuda,
            "min_vram_gib": self.min_vram_gib, "min_ram_gib": self.min_ram_gib,
            "allowed_hosts": sorted(self.allowed_hosts),
        }
        key.update(self._gpu_fields())
        return canonical_json(key)

    def _gpu_fields(self) -> dict:
        """The GPU fields that differ from their defaults: left out of the class key of a job without
        them, so the classes of jobs written before these fields existed stay as they were."""
        out: dict[str, Any] = {}
        if self.gpus:
            out["gpus"] = self.gpus
        if self.gpu_share:
            out["gpu_share"] = True
        if self.mixed_gpus:
            out["mixed_gpus"] = True
        return out

    def to_json(self) -> dict:
        # Field by field: dataclasses.asdict deep-copies through copy.deepcopy and was a third of a
        # 10,000-job manifest reload.
        return {"model": self.model, "mode": self.mode, "hyper": _copy_plain(self.hyper),
                "split_recipe": self.split_recipe, "train_hosts": list(self.train_hosts), "seed": self.seed,
                "require_cuda": self.require_cuda, "prefer_cuda": self.prefer_cuda,
                "min_vram_gib": self.min_vram_gib, "min_ram_gib": self.min_ram_gib,
                "allowed_hosts": list(self.allowed_hosts), "priority": self.priority, "retries": self.retries,
                "name": self.name, "after": list(self.after), "gpus": self.gpus, "gpu_share": self.gpu_share,
                "mixed_gpus": self.mixed_gpus, "expected_minutes": self.expected_minutes,
                "checkpoint_every_s": self.checkpoint_every_s, "sweep": self.sweep,
                "max_runtime_s": self.max_runtime_s, "stall_after_s": self.stall_after_s,
                "stop": None if self.stop is None else dict(self.stop)}

    @classmethod
    def from_json(cls, d: dict) -> "JobSpec":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("train_hosts", "allowed_hosts", "after"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class Manifest:
    fleet: FleetConfig = field(default_factory=FleetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    hosts: tuple[HostSpec, ...] = ()
    jobs: tuple[JobSpec, ...] = ()
    source: str = "<memory>"  # file name, for messages
    sweeps_expanded: int = 0  # how many jobs came from [[sweeps]] entries

    def host(self, host_id: str) -> HostSpec | None:
        for h in self.hosts:
            if h.id == host_id:
                return h
        return None

    def to_json(self) -> dict:
        return {"fleet": self.fleet.to_json(), "trainer": self.trainer.to_json(),
                "hosts": [h.to_json() for h in self.hosts], "jobs": [j.to_json() for j in self.jobs],
                "source": self.source, "sweeps_expanded": self.sweeps_expanded}

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        return cls(fleet=FleetConfig.from_json(d.get("fleet", {})), trainer=TrainerConfig.from_json(d.get("trainer", {})),
                   hosts=tuple(HostSpec.from_json(h) for h in d.get("hosts", ())),
                   jobs=tuple(JobSpec.from_json(j) for j in d.get("jobs", ())),
                   source=d.get("source", "<memory>"), sweeps_expanded=d.get("sweeps_expanded", 0))


def _gib_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def normalize_capability(raw: dict) -> dict:
    """The capability shape every layer relies on, with defaults for missing keys.

    Keys: host, os, python, cores (int), ram_gib (float), cuda (bool),
    gpus ([{"index", "name", "vram_gib"}]), vram_gib (largest GPU, 0 without),
    torch (version or None), git_commit (or None), disk_free_gib, slots (int >= 1).
    Unknown keys are kept (shown to operators, ignored by policy).
    """
    cap = dict(raw or {})
    gpus = [{**g, "vram_gib": float(g["vram_gib"]) if _gib_number(g.get("vram_gib")) else 0.0}
            for g in cap.get("gpus") if isinstance(g, dict)] if isinstance(cap.get("gpus"), list) else []
    cap["gpus"] = gpus
    cap["cuda"] = bool(cap.get("cuda", bool(gpus)))
    vram = cap.get("vram_gib")
    if not _gib_number(vram):
        vram = max((g["vram_gib"] for g in gpus), default=0.0)
    cap["vram_gib"] = float(vram)
    for k in ("ram_gib", "disk_free_gib"):
        v = cap.get(k)
        cap[k] = float(v) if _gib_number(v) else 0.0
    cores = cap.get("cores")
    cap["cores"] = int(cores) if isinstance(cores, int) and not isinstance(cores, bool) and cores > 0 else 1
    slots = cap.get("slots")
    if not (isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1):
        slots = max(1, len(gpus)) if cap["cuda"] else 1
    cap["slots"] = slots
    for k in ("host", "os", "python", "torch", "git_commit"):
        v = cap.get(k)
        cap[k] = v if isinstance(v, str) else None
    return cap
