"""The training manifest: TOML text -> a validated, frozen ``model.Manifest``, every problem at once.

Pure core. ``parse`` works on text; only ``load`` reads a file. Running the
trainer's describe command is manifest_cmd's business: ``parse`` only takes its
result (``describe``: model -> accepted hyper keys). Every problem names the
file, the entry and the field, e.g.
``training_manifest.toml: jobs[3] (model=mlp).min_vram_gib: expected a number >= 0, got -2``;
``ManifestError.problems`` lists them all. Indexes count from 0.

Format (a full example: etc/training_manifest.toml.example)::

    [fleet]            name, stale_after_s (600, >= 3 * heartbeat_s), heartbeat_s (30),
                       max_attempts (3), max_artifact_bytes, retry_backoff_s (30),
                       worker_timeout_s (120), checkpoint_every_s (600: how often a
                       running job's newest checkpoint is uploaded, at most; 0: each one),
                       retries (0: a trainer's failure is final),
                       max_runtime_s, stall_after_s (> 0; unset: no limit)
    [[fleet.peers]]    id, url                      coordinator peers
    [trainer]          command  argv; placeholders {python} {model} {mode} {hyper}
                                {seed} {split_recipe} {train_hosts} {out}
                       hyper_keys  table: model or "*" -> accepted hyper keys
                       describe    argv printing that table as JSON ({python} allowed)
    [[hosts]]          id, allow_jobs / deny_jobs (globs over model names; deny wins),
                       slots, role (worker | coordinator | both),
                       capability (overrides of detected values: cuda, vram_gib, ...),
                       gpu_share (jobs may share a GPU while their VRAM needs fit),
                       speed (> 0, relative to 1.0: which hosts finish a job sooner)
    [[jobs]]           model, mode (required); hyper (table), split_recipe ("default"),
                       train_hosts (strings), seed (0): these six make the job id;
                       require_cuda, prefer_cuda, min_vram_gib, min_ram_gib,
                       allowed_hosts, priority, retries, name, after (names),
                       gpus (N GPUs of one host), gpu_share, mixed_gpus (with gpus:
                       GPUs of different models will do), expected_minutes (> 0),
                       checkpoint_every_s (>= 0; default the fleet's),
                       max_runtime_s, stall_after_s (> 0; unset: [fleet]'s)
    [[sweeps]]         the keys of [[jobs]]; model, mode, split_recipe, seed,
                       train_hosts (a list of lists) and each hyper.<key> may be a
                       list of alternatives. The cross product becomes jobs, in
                       the order model, mode, split_recipe, train_hosts, seed, then
                       hyper keys by name, the last varying fastest. ``name`` is a
                       prefix: jobs are named <name>-<index>; ``after`` naming a
                       sweep waits for all of its jobs.

In ``[[jobs]]`` a list-valued hyper entry is a literal value (``hidden = [64, 64]``);
in ``[[sweeps]]`` it lists alternatives (``hidden = [[64, 64], [128]]``).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import re
import string
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from cis490fleet import stop_rules
from cis490fleet.errors import ManifestError
from cis490fleet.model import (
    HOST_ID_RE,
    NAME_RE,
    NOTIFY_EVENTS,
    NOTIFY_FORMATS,
    FleetConfig,
    HostSpec,
    JobSpec,
    Manifest,
    NotifyTarget,
    TrainerConfig,
)

PLACEHOLDERS = ("python", "model", "mode", "hyper", "seed", "split_recipe", "train_hosts", "out")
DESCRIBE_PLACEHOLDERS = ("python",)
INPUT_PLACEHOLDER_RE = re.compile(r"input\.[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # {input.NAME}: a dependency's bundle
ROLES = ("worker", "coordinator", "both")
MAX_SWEEP_JOBS = 10_000

TOP_KEYS = ("fleet", "trainer", "hosts", "jobs", "sweeps", "notify")
NOTIFY_KEYS = ("url", "on", "format", "secret_env")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
FLEET_KEYS = ("name", "peers", "stale_after_s", "heartbeat_s", "max_attempts", "max_artifact_bytes",
              "retry_backoff_s", "worker_timeout_s", "checkpoint_every_s", "retries", "max_runtime_s",
              "stall_after_s")
PEER_KEYS = ("id", "url")
TRAINER_KEYS = ("command", "hyper_keys", "describe")
HOST_KEYS = ("id", "allow_jobs", "deny_jobs", "slots", "role", "capability", "gpu_share", "speed")
CAPABILITY_KEYS = ("cuda", "vram_gib", "ram_gib", "disk_free_gib", "cores", "slots", "gpus", "os", "python",
                   "torch", "git_commit")
GPU_KEYS = ("index", "name", "vram_gib")
JOB_KEYS = ("model", "mode", "hyper", "split_recipe", "train_hosts", "seed", "require_cuda", "prefer_cuda",
            "min_vram_gib", "min_ram_gib", "allowed_hosts", "priority", "retries", "name", "after", "gpus",
            "gpu_share", "mixed_gpus", "expected_minutes", "checkpoint_every_s", "max_runtime_s", "stall_after_s", "stop")
STOP_KEYS = ("metric", "mode", "rule", "min_epochs", "reduction_factor")

_NAME_RULE = "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
_HOST_RULE = "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
_URL_RE = re.compile(r"^https?://[^/\s?#]+(/\S*)?$")
_BAD: Any = object()


def load(path: str | os.PathLike, *, describe: dict | None = None) -> Manifest:
    """Read and parse a manifest file; a missing or unreadable file is one clear problem."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ManifestError([f"{source}: no such file; check the path "
                             "(etc/training_manifest.toml.example is a complete example)"]) from None
    except IsADirectoryError:
        raise ManifestError([f"{source}: is a directory; give the path of the manifest file"]) from None
    except OSError as err:
        raise ManifestError([f"{source}: cannot read it ({err.strerror or err}); check its permissions"]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ManifestError([f"{source}: not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8"]) from None
    return parse(text, source, describe=describe)


def parse(text: str, source: str = "training_manifest.toml", *, describe: dict | None = None) -> Manifest:
    """Validate manifest text; raise ManifestError listing every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ManifestError([f"{source}: {_syntax_message(err, text)}"]) from None
    accepted = None
    if describe is not None:
        accepted = {str(m): frozenset(str(k) for k in keys) for m, keys in describe.items()}
    return _Parser(source, accepted).manifest(data)


def _syntax_message(err: tomllib.TOMLDecodeError, text: str) -> str:
    msg = str(getattr(err, "msg", None) or err)
    line, col = getattr(err, "lineno", None), getattr(err, "colno", None)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
    if m:
        line, col, msg = int(m.group(1)), int(m.group(2)), msg[:m.start()]
    elif msg.endswith("(at end of document)"):
        msg = msg[: -len("(at end of document)")].rstrip()
        lines = text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
    if line is None:
        return f"invalid TOML: {msg}"
    return f"line {line}, column {col}: invalid TOML: {msg}"


def _show(value: Any) -> str:
    """A value as the operator wrote it in TOML, shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, float):
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, (datetime.date, datetime.time)):
        text = f"a date/time ({value.isoformat()})"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: str, choices, listing: str = "expected one of") -> str:
    import difflib  # only a manifest with a mistake needs it

    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    if not choices:
        return ""
    return f"; {listing}: {', '.join(choices)}"


def _label(kind: str, index: int, raw: Any, *keys: str) -> str:
    parts = []
    if isinstance(raw, dict):
        parts = [f"{k}={raw[k]}" for k in keys if isinstance(raw.get(k), str) and len(raw[k]) <= 64]
    return f"{kind}[{index}]" + (f" ({', '.join(parts)})" if parts else "")


@dataclass
class _Entry:
    """One [[jobs]] or [[sweeps]] table, validated, before names and dependencies are resolved."""

    label: str
    is_sweep: bool
    fixed: dict  # constraint fields shared by every job of the entry
    identities: list[dict] = field(default_factory=list)  # one per job: the six identity fields
    labels: list[str] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)
    prefix: str | None = None  # a sweep's name
    sweep: str | None = None  # what its jobs' JobSpec.sweep says: the sweep's name, else "sweeps[<index>]"
    after: tuple[str, ...] = ()
    resolved_after: tuple[str, ...] = ()


class _Parser:
    def __init__(self, source: str, describe: dict[str, frozenset[str]] | None):
        self.source = source
        self.describe = describe
        self.problems: list[str] = []
        self.declared_hosts: list[str] = []

    def problem(self, where: str, msg: str) -> None:
        self.problems.append(f"{self.source}: {where}: {msg}" if where else f"{self.source}: {msg}")

    # -- value checks: each returns the value, or _BAD after recording a problem --

    def known_keys(self, where: str, table: dict, allowed) -> None:
        for key in table:
            if key not in allowed:
                self.problem(where, f"unknown key {key!r}{_suggest(key, allowed, 'known keys')}")

    def table(self, where: str, value: Any) -> Any:
        if not isinstance(value, dict):
            self.problem(where, f"expected a table, got {_show(value)}")
            return _BAD
        return value

    def tables(self, key: str, value: Any) -> list[dict | None]:
        """The entries of an array of tables such as [[jobs]]; non-tables are reported and become None."""
        if isinstance(value, dict):
            self.problem(key, f"expected an array of tables ([[{key}]]), got a single table ([{key}]); "
                              f"write [[{key}]] above each entry")
            return []
        if not isinstance(value, list):
            self.problem(key, f"expected an array of tables ([[{key}]]), got {_show(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                out.append(item)
            else:
                self.problem(f"{key}[{i}]", f"expected a table, got {_show(item)}")
                out.append(None)
        return out

    def string(self, where: str, value: Any, *, pattern: re.Pattern | None = None, rule: str = "") -> Any:
        if not isinstance(value, str) or not value:
            self.problem(where, f"expected a non-empty string, got {_show(value)}")
            return _BAD
        if pattern is not None and not pattern.fullmatch(value):
            self.problem(where, f"{_show(value)} is not allowed here: {rule}")
            return _BAD
        return value

    def name(self, where: str, value: Any) -> Any:
        return self.string(where, value, pattern=NAME_RE, rule=_NAME_RULE)

    def host_id(self, where: str, value: Any) -> Any:
        return self.string(where, value, pattern=HOST_ID_RE, rule=_HOST_RULE)

    def boolean(self, where: str, value: Any) -> Any:
        if not isinstance(value, bool):
            self.problem(where, f"expected true or false, got {_show(value)}")
            return _BAD
        return value

    def integer(self, where: str, value: Any, minimum: int | None = None) -> Any:
        want = "an integer" if minimum is None else f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(where, f"expected {want}, got {_show(value)}")
            return _BAD
        if minimum is not None and value < minimum:
            self.problem(where, f"expected {want}, got {_show(value)}")
            return _BAD
        return value

    def number(self, where: str, value: Any, *, positive: bool = False) -> Any:
        want = "a number > 0" if positive else "a number >= 0"
        if isinstance(value, bool):
            self.problem(where, f"expected {want}, got {_show(value)} (a boolean is not a number)")
            return _BAD
        if not isinstance(value, (int, float)):
            self.problem(where, f"expected {want}, got {_show(value)}")
            return _BAD
        if isinstance(value, float) and not math.isfinite(value):
            self.problem(where, f"expected {want}, got {_show(value)} (NaN and infinity are not allowed)")
            return _BAD
        if value < 0 or (positive and value == 0):
            self.problem(where, f"expected {want}, got {_show(value)}")
            return _BAD
        return value

    def strings(self, where: str, value: Any, item: Callable[[str, Any], Any] | None = None) -> Any:
        item = item or self.string
        if not isinstance(value, list):
            self.problem(where, f"expected a list of strings, got {_show(value)}")
            return _BAD
        checked = [item(f"{where}[{i}]", v) for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in checked) else tuple(checked)

    def hyper_value(self, where: str, value: Any) -> Any:
        if isinstance(value, (bool, str, int)):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                self.problem(where, f"{_show(value)} is not allowed: NaN and infinity have no job id encoding; "
                                    "give a finite number")
                return _BAD
            return value
        if isinstance(value, list):
            checked = [self.hyper_value(f"{where}[{i}]", v) for i, v in enumerate(value)]
            return _BAD if any(v is _BAD for v in checked) else checked
        if isinstance(value, dict):
            checked = {k: self.hyper_value(f"{where}.{k}", v) for k, v in value.items()}
            return _BAD if any(v is _BAD for v in checked.values()) else checked
        self.problem(where, f"expected a string, number, boolean, array or table, got {_show(value)} "
                            "(dates and times have no JSON form; quote them)")
        return _BAD

    def template(self, where: str, value: Any, allowed: tuple[str, ...]) -> Any:
        if self.string(where, value) is _BAD:
            return _BAD
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as err:
            self.problem(where, f"{_show(value)} is not a valid template ({err}); write {{{{ and }}}} for literal braces")
            return _BAD
        ok = True
        for f in fields:
            if allowed is PLACEHOLDERS and (f == "inputs" or INPUT_PLACEHOLDER_RE.fullmatch(f)):
                continue
            if f not in allowed:
                self.problem(where, f"unknown placeholder {{{f}}}{_suggest(f, allowed, 'known placeholders')}")
                ok = False
        return value if ok else _BAD

    # -- sections --

    def manifest(self, data: dict) -> Manifest:
        self.known_keys("", data, TOP_KEYS)
        fleet = self.fleet(data.get("fleet", {}))
        notify = self.notify(data.get("notify", []))
        if notify:
            fleet = dataclasses.replace(fleet, notify=notify)
        trainer = self.trainer(data.get("trainer"))
        hosts = self.hosts(data.get("hosts", []))
        entries = [self.entry("jobs", i, raw, trainer) for i, raw in enumerate(self.tables("jobs", data.get("jobs", [])))]
        entries += [self.entry("sweeps", i, raw, trainer)
                    for i, raw in enumerate(self.tables("sweeps", data.get("sweeps", [])))]
        jobs = self.resolve([e for e in entries if e is not None])
        if self.problems:
            raise ManifestError(self.problems)
        return Manifest(fleet=fleet, trainer=trainer, hosts=tuple(hosts), jobs=tuple(j for _, j in jobs),
                        source=self.source,
                        sweeps_expanded=sum(len(e.identities) for e in entries if e is not None and e.is_sweep))

    def fleet(self, raw: Any) -> FleetConfig:
        if self.table("fleet", raw) is _BAD:
            return FleetConfig()
        self.known_keys("fleet", raw, FLEET_KEYS)
        values: dict[str, Any] = {}
        if "name" in raw:
            values["name"] = self.name("fleet.name", raw["name"])
        for key in ("stale_after_s", "heartbeat_s", "worker_timeout_s", "max_runtime_s", "stall_after_s"):
            if key in raw:
                values[key] = self.number(f"fleet.{key}", raw[key], positive=True)
        for key in ("retry_backoff_s", "checkpoint_every_s"):
            if key in raw:
                values[key] = self.number(f"fleet.{key}", raw[key])
        if "retries" in raw:
            values["retries"] = self.integer("fleet.retries", raw["retries"], minimum=0)
        for key in ("max_attempts", "max_artifact_bytes"):
            if key in raw:
                values[key] = self.integer(f"fleet.{key}", raw[key], minimum=1)
        if "peers" in raw:
            values["peers"] = self.peers(raw["peers"])
        values = {k: v for k, v in values.items() if v is not _BAD}
        for key in ("stale_after_s", "heartbeat_s", "worker_timeout_s", "retry_backoff_s", "checkpoint_every_s",
                    "max_runtime_s", "stall_after_s"):
            if key in values:
                values[key] = float(values[key])
        config = FleetConfig(**values)
        if config.stale_after_s < 3 * config.heartbeat_s:
            self.problem("fleet.stale_after_s",
                         f"{config.stale_after_s:g} is less than 3 * heartbeat_s "
                         f"(3 * {config.heartbeat_s:g} = {3 * config.heartbeat_s:g}): a worker that "
                         "misses two heartbeats would lose its job; raise stale_after_s or lower heartbeat_s")
        return config

    def peers(self, raw: Any) -> Any:
        seen: dict[str, str] = {}
        peers = []
        for i, entry in enumerate(self.tables("fleet.peers", raw)):
            where = _label("fleet.peers", i, entry, "id")
            if entry is None:
                continue
            self.known_keys(where, entry, PEER_KEYS)
            pid = self.host_id(f"{where}.id", entry["id"]) if "id" in entry else self.missing(where, "id")
            url = self.url(where, entry)
            if pid is not _BAD and pid in seen:
                self.problem(f"{where}.id", f"duplicate peer id {pid!r} (also {seen[pid]}); each peer appears once")
            elif pid is not _BAD:
                seen[pid] = where
            if pid is not _BAD and url is not _BAD:
                peers.append((pid, url.rstrip("/")))
        return tuple(peers)

    def url(self, where: str, entry: dict) -> Any:
        """The entry's ``url``: an http:// or https:// URL, else a problem and _BAD."""
        if "url" not in entry:
            return self.missing(where, "url")
        url = entry["url"]
        if not isinstance(url, str) or not _URL_RE.match(url):
            self.problem(f"{where}.url", f"expected an http:// or https:// URL, got {_show(url)}")
            return _BAD
        return url

    def choice(self, where: str, what: str, value: Any, choices: tuple[str, ...]) -> Any:
        if value in choices:
            return value
        self.problem(where, f"unknown {what} {_show(value)}{_suggest(str(value), choices)}")
        return _BAD

    def notify(self, raw: Any) -> tuple[NotifyTarget, ...]:
        targets = []
        for i, entry in enumerate(self.tables("notify", raw)):
            where = _label("notify", i, entry, "url")
            if entry is None:
                continue
            self.known_keys(where, entry, NOTIFY_KEYS)
            url = self.url(where, entry)
            values: dict[str, Any] = {}
            if "on" in entry:
                on = self.strings(f"{where}.on", entry["on"])
                if on is not _BAD:
                    for j, event in enumerate(on):
                        if event not in NOTIFY_EVENTS:
                            self.problem(f"{where}.on[{j}]", f"unknown event {_show(event)}"
                                                             f"{_suggest(event, NOTIFY_EVENTS)}")
                            on = _BAD
                if on is not _BAD and not on:
                    self.problem(f"{where}.on", f"name at least one event of {', '.join(NOTIFY_EVENTS)}, or "
                                                "remove the [[notify]] table")
                    on = _BAD
                values["on"] = on if on is _BAD else tuple(dict.fromkeys(on))
            if "format" in entry:
                values["format"] = self.choice(f"{where}.format", "format", entry["format"], NOTIFY_FORMATS)
            if "secret_env" in entry:
                values["secret_env"] = self.string(f"{where}.secret_env", entry["secret_env"], pattern=_ENV_NAME_RE,
                                                   rule="the name of an environment variable of the coordinator "
                                                        "(letters, digits and '_', not starting with a digit)")
            if url is not _BAD and _BAD not in values.values():
                targets.append(NotifyTarget(url=url, **values))
        return tuple(targets)

    def missing(self, where: str, key: str) -> Any:
        self.problem(where, f"missing required key {key!r}")
        return _BAD

    def trainer(self, raw: Any) -> TrainerConfig:
        if raw is None or self.table("trainer", raw) is _BAD:
            return TrainerConfig()
        self.known_keys("trainer", raw, TRAINER_KEYS)
        values: dict[str, Any] = {}
        for key, allowed in (("command", PLACEHOLDERS), ("describe", DESCRIBE_PLACEHOLDERS)):
            if key not in raw:
                continue
            argv = self.strings(f"trainer.{key}", raw[key], lambda w, v, a=allowed: self.template(w, v, a))
            if argv is not _BAD and key == "command" and not argv:
                self.problem("trainer.command", "expected the trainer's argv, got an empty list")
                argv = _BAD
            if argv is not _BAD:
                values[key] = argv
        if "hyper_keys" in raw and self.table("trainer.hyper_keys", raw["hyper_keys"]) is not _BAD:
            table = []
            for model, keys in raw["hyper_keys"].items():
                where = f"trainer.hyper_keys.{model}"
                if model != "*" and self.name(where, model) is _BAD:
                    continue
                keys = self.strings(where, keys)
                if keys is not _BAD:
                    table.append((model, keys))
            values["hyper_keys"] = tuple(sorted(table))
        return TrainerConfig(**values)

    def hosts(self, raw: Any) -> list[HostSpec]:
        entries = self.tables("hosts", raw)
        self.declared_hosts = list(dict.fromkeys(e["id"] for e in entries if e and isinstance(e.get("id"), str)))
        seen: dict[str, str] = {}
        hosts = []
        for i, entry in enumerate(entries):
            if entry is None:
                continue
            where = _label("hosts", i, entry, "id")
            self.known_keys(where, entry, HOST_KEYS)
            values: dict[str, Any] = {}
            values["id"] = self.host_id(f"{where}.id", entry["id"]) if "id" in entry else self.missing(where, "id")
            for key in ("allow_jobs", "deny_jobs"):
                if key in entry:
                    values[key] = self.strings(f"{where}.{key}", entry[key])
            if "slots" in entry:
                values["slots"] = self.integer(f"{where}.slots", entry["slots"], minimum=1)
            if "gpu_share" in entry:
                values["gpu_share"] = self.boolean(f"{where}.gpu_share", entry["gpu_share"])
            if "speed" in entry:
                speed = self.number(f"{where}.speed", entry["speed"], positive=True)
                values["speed"] = speed if speed is _BAD else float(speed)
            if "role" in entry:
                role = entry["role"]
                if role not in ROLES:
                    self.problem(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {_show(role)}")
                    role = _BAD
                values["role"] = role
            if "capability" in entry:
                values["capability"] = self.capability(f"{where}.capability", entry["capability"])
            hid = values["id"]
            if hid is not _BAD and hid in seen:
                self.problem(f"{where}.id", f"duplicate host id {hid!r} (also {seen[hid]}); "
                                            "merge the two [[hosts]] entries")
                continue
            if hid is not _BAD:
                seen[hid] = where
            if all(v is not _BAD for v in values.values()):
                hosts.append(HostSpec(**values))
        return hosts

    def capability(self, where: str, raw: Any) -> Any:
        if self.table(where, raw) is _BAD:
            return _BAD
        self.known_keys(where, raw, CAPABILITY_KEYS)
        out: dict[str, Any] = {}
        for key, value in raw.items():
            at = f"{where}.{key}"
            if key == "cuda":
                out[key] = self.boolean(at, value)
            elif key in ("vram_gib", "ram_gib", "disk_free_gib"):
                v = self.number(at, value)
                out[key] = v if v is _BAD else float(v)
            elif key in ("cores", "slots"):
                out[key] = self.integer(at, value, minimum=1)
            elif key in ("os", "python", "torch", "git_commit"):
                out[key] = self.string(at, value)
            elif key == "gpus":
                out[key] = self.gpus(at, value)
        return _BAD if any(v is _BAD for v in out.values()) else out

    def gpus(self, where: str, raw: Any) -> Any:
        if not isinstance(raw, list):
            self.problem(where, f"expected an array of tables {{index, name, vram_gib}}, got {_show(raw)}")
            return _BAD
        gpus = []
        for i, gpu in enumerate(raw):
            at = f"{where}[{i}]"
            if self.table(at, gpu) is _BAD:
                gpus.append(_BAD)
                continue
            self.known_keys(at, gpu, GPU_KEYS)
            index = self.integer(f"{at}.index", gpu.get("index", i), minimum=0)
            name = self.string(f"{at}.name", gpu["name"]) if "name" in gpu else ""
            vram = self.number(f"{at}.vram_gib", gpu["vram_gib"]) if "vram_gib" in gpu else self.missing(at, "vram_gib")
            ok = _BAD not in (index, name, vram)
            gpus.append({"index": index, "name": name, "vram_gib": float(vram)} if ok else _BAD)
        return _BAD if any(g is _BAD for g in gpus) else gpus

    # -- jobs and sweeps --

    def axis(self, where: str, value: Any, sweep: bool, check: Callable[[str, Any], Any]) -> Any:
        """The alternatives of one identity field: a list in a sweep, else the one value."""
        if sweep and isinstance(value, list):
            if not value:
                self.problem(where, "an empty list expands to no jobs; give at least one value")
                return _BAD
            checked = [check(f"{where}[{i}]", v) for i, v in enumerate(value)]
            return _BAD if any(v is _BAD for v in checked) else checked
        if not sweep and isinstance(value, list):
            self.problem(where, f"expected one value, got {_show(value)}; "
                                "to train several values, use a [[sweeps]] entry")
            return _BAD
        checked = check(where, value)
        return _BAD if checked is _BAD else [checked]

    def entry(self, kind: str, index: int, raw: dict | None, trainer: TrainerConfig) -> _Entry | None:
        if raw is None:
            return None
        sweep = kind == "sweeps"
        label = _label(kind, index, raw, "model", "name")
        self.known_keys(label, raw, JOB_KEYS)
        axes: list[tuple[str, Any]] = []
        for key in ("model", "mode"):
            if key not in raw:
                axes.append((key, self.missing(label, key)))
            else:
                axes.append((key, self.axis(f"{label}.{key}", raw[key], sweep, self.name)))
        axes.append(("split_recipe", self.axis(f"{label}.split_recipe", raw.get("split_recipe", "default"),
                                               sweep, self.string)))
        hosts = raw.get("train_hosts", [])
        if sweep and isinstance(hosts, list) and any(isinstance(h, list) for h in hosts):
            axes.append(("train_hosts", self.axis(f"{label}.train_hosts", hosts, True, self.strings)))
        else:
            th = self.strings(f"{label}.train_hosts", hosts)
            axes.append(("train_hosts", _BAD if th is _BAD else [th]))
        axes.append(("seed", self.axis(f"{label}.seed", raw.get("seed", 0), sweep, self.integer)))
        hyper_axes: list[tuple[str, Any]] = []
        hyper = raw.get("hyper", {})
        if self.table(f"{label}.hyper", hyper) is _BAD:
            hyper_axes.append(("", _BAD))
            hyper = {}
        for key, value in hyper.items():
            where = f"{label}.hyper.{key}"
            if sweep and isinstance(value, list):
                hyper_axes.append((key, self.axis(where, value, True, self.hyper_value)))
            else:
                v = self.hyper_value(where, value)
                hyper_axes.append((key, _BAD if v is _BAD else [v]))

        fixed = self.constraints(label, raw)
        if "stop" in raw:
            rule = self.stop_rule(f"{label}.stop", raw["stop"], sweep)
            fixed = _BAD if _BAD in (fixed, rule) else {**fixed, "stop": rule}
        name = raw.get("name")
        if sweep and isinstance(name, list):
            self.problem(f"{label}.name", "a sweep's name cannot be a list: it is the prefix of its jobs' "
                                          "names (<name>-<index>); give one string")
            name = _BAD
        elif name is not None:
            name = self.name(f"{label}.name", name)
        after = self.strings(f"{label}.after", raw["after"]) if "after" in raw else ()

        models = dict(axes)["model"]
        if models is not _BAD:
            self.check_hyper_keys(label, models, list(hyper), trainer)
        if any(v is _BAD for _, v in axes + hyper_axes) or _BAD in (fixed, name, after):
            return _Entry(label, sweep, {}, prefix=name if isinstance(name, str) and sweep else None,
                          names=[name] if isinstance(name, str) and not sweep else [],
                          after=() if after is _BAD else after)

        hyper_axes.sort(key=lambda kv: kv[0])
        keys: list[Any] = [k for k, _ in axes] + [("hyper", k) for k, _ in hyper_axes]
        values = [v for _, v in axes] + [v for _, v in hyper_axes]
        count = math.prod(len(v) for v in values)
        if count > MAX_SWEEP_JOBS:
            self.problem(label, f"expands to {count} jobs, more than {MAX_SWEEP_JOBS}; split it into smaller sweeps")
            return None
        entry = _Entry(label, sweep, fixed, after=after, sweep=(name or f"sweeps[{index}]") if sweep else None)
        order = list(hyper)
        for i, combo in enumerate(itertools.product(*values)):
            identity = {}
            hyper_values = {}
            for key, value in zip(keys, combo):
                if isinstance(key, tuple):
                    hyper_values[key[1]] = value
                else:
                    identity[key] = value
            identity["hyper"] = {k: hyper_values[k] for k in order}
            identity["train_hosts"] = tuple(identity["train_hosts"])
            entry.identities.append(identity)
            if sweep:
                job_name = f"{name}-{i}" if name else None
                entry.labels.append(f"{kind}[{index}][{i}]" + _job_suffix(identity["model"], job_name))
                entry.names.append(job_name)
            else:
                entry.labels.append(label)
                entry.names.append(name)
        if sweep and name:
            entry.prefix = name
            last = entry.names[-1]
            if not NAME_RE.fullmatch(last):
                self.problem(f"{label}.name", f"the job names it makes ({last!r}) are too long; {_NAME_RULE}")
        return entry

    def stop_rule(self, where: str, raw: Any, sweep: bool) -> Any:
        if not sweep:
            self.problem(where, "early stopping compares the jobs of one sweep: move 'stop' to a [[sweeps]] entry")
            return _BAD
        if self.table(where, raw) is _BAD:
            return _BAD
        self.known_keys(where, raw, STOP_KEYS)
        out: dict[str, Any] = {}
        out["metric"] = self.string(f"{where}.metric", raw["metric"]) if "metric" in raw else self.missing(where, "metric")
        for key, choices in (("mode", stop_rules.MODES), ("rule", stop_rules.RULES)):
            if key in raw:
                out[key] = self.choice(f"{where}.{key}", key, raw[key], choices)
        if "min_epochs" in raw:
            out["min_epochs"] = self.integer(f"{where}.min_epochs", raw["min_epochs"], minimum=1)
        if "reduction_factor" in raw:
            out["reduction_factor"] = self.integer(f"{where}.reduction_factor", raw["reduction_factor"], minimum=2)
        return _BAD if _BAD in out.values() else stop_rules.normalise(out)

    def constraints(self, label: str, raw: dict) -> Any:
        out: dict[str, Any] = {}
        for key in ("require_cuda", "prefer_cuda", "gpu_share", "mixed_gpus"):
            if key in raw:
                out[key] = self.boolean(f"{label}.{key}", raw[key])
        if "gpus" in raw:
            out["gpus"] = self.integer(f"{label}.gpus", raw["gpus"], minimum=1)
        for key in ("expected_minutes", "max_runtime_s", "stall_after_s"):
            if key in raw:
                v = self.number(f"{label}.{key}", raw[key], positive=True)
                out[key] = v if v is _BAD else float(v)
        for key in ("min_vram_gib", "min_ram_gib", "checkpoint_every_s"):
            if key in raw:
                v = self.number(f"{label}.{key}", raw[key])
                out[key] = v if v is _BAD else float(v)
        if "priority" in raw:
            out["priority"] = self.integer(f"{label}.priority", raw["priority"])
        if "retries" in raw:
            out["retries"] = self.integer(f"{label}.retries", raw["retries"], minimum=0)
        if "allowed_hosts" in raw:
            out["allowed_hosts"] = self.allowed_hosts(f"{label}.allowed_hosts", raw["allowed_hosts"])
        return _BAD if any(v is _BAD for v in out.values()) else out

    def allowed_hosts(self, where: str, raw: Any) -> Any:
        hosts = self.strings(where, raw, self.host_id)
        if hosts is _BAD or not self.declared_hosts:
            return hosts
        ok = True
        for i, h in enumerate(hosts):
            if h not in self.declared_hosts:
                self.problem(f"{where}[{i}]", f"unknown host {h!r}"
                                              f"{_suggest(h, self.declared_hosts, 'declared [[hosts]]')}")
                ok = False
        return hosts if ok else _BAD

    def check_hyper_keys(self, label: str, models: list[str], keys: list[str], trainer: TrainerConfig) -> None:
        for model in dict.fromkeys(models):
            if self.describe is not None:
                if model not in self.describe and "*" not in self.describe:
                    self.problem(f"{label}.model", f"the trainer does not know model {model!r}"
                                                   f"{_suggest(model, sorted(self.describe), 'it describes')}")
                    continue
                accepted = self.describe.get(model, frozenset()) | self.describe.get("*", frozenset())
                origin = "the trainer's describe output"
            else:
                accepted = trainer.accepted_keys(model)
                origin = "trainer.hyper_keys"
                if accepted is None:
                    continue
            for key in keys:
                if key not in accepted:
                    self.problem(f"{label}.hyper.{key}",
                                 f"the trainer does not accept hyper key {key!r} for model {model!r} (per {origin})"
                                 f"{_suggest(key, sorted(accepted), 'it accepts') or '; it accepts none'}")

    def resolve(self, entries: list[_Entry]) -> list[tuple[str, JobSpec]]:
        """Check names, resolve and check ``after``, build the jobs, and find duplicate ids."""
        where_named: dict[str, str] = {}
        entry_of: dict[str, _Entry] = {}
        for entry in entries:
            for label, name in zip(entry.labels or [entry.label] * len(entry.names), entry.names):
                if name is None:
                    continue
                if name in where_named:
                    self.problem(f"{label}.name" if not entry.is_sweep else f"{entry.label}.name",
                                 f"duplicate name {name!r} (also {where_named[name]}); names must be unique")
                else:
                    where_named[name] = label
                    entry_of[name] = entry
        groups: dict[str, list[str]] = {}
        for entry in entries:
            if entry.prefix is None:
                continue
            if entry.prefix in where_named or entry.prefix in groups:
                other = where_named.get(entry.prefix) or next(e.label for e in entries if e.prefix == entry.prefix)
                self.problem(f"{entry.label}.name", f"{entry.prefix!r} is also the name of {other}; "
                                                    "'after' could not tell them apart: rename one")
                continue
            groups[entry.prefix] = [n for n in entry.names if n is not None]

        for entry in entries:
            resolved: list[str] = []
            for i, ref in enumerate(entry.after):
                if ref in where_named:
                    resolved.append(ref)
                elif ref in groups:
                    resolved.extend(groups[ref])
                else:
                    known = sorted(set(where_named) | set(groups))
                    self.problem(f"{entry.label}.after[{i}]", f"no job or sweep is named {ref!r}"
                                                               f"{_suggest(ref, known, 'known names')}")
            own = set(entry.names)
            if own & set(resolved):
                self.problem(f"{entry.label}.after", "a job cannot wait for itself; remove its own name from 'after'")
                resolved = [n for n in resolved if n not in own]
            entry.resolved_after = tuple(dict.fromkeys(resolved))

        graph = {name: e.resolved_after for name, e in entry_of.items()}
        reported: set[frozenset] = set()
        for cycle in _cycles(graph):
            key = frozenset(entry_of[n].label for n in cycle)
            if key in reported:
                continue
            reported.add(key)
            self.problem(f"{entry_of[cycle[0]].label}.after",
                         f"dependency cycle {' -> '.join(cycle)}: none of these jobs can ever start; "
                         "remove one of these 'after' entries")

        jobs: list[tuple[str, JobSpec]] = []
        seen: dict[str, str] = {}
        for entry in entries:
            for label, identity, name in zip(entry.labels, entry.identities, entry.names):
                job = JobSpec(**identity, **entry.fixed, name=name, after=entry.resolved_after, sweep=entry.sweep)
                job_id = job.id
                if job_id in seen:
                    self.problem(label, f"the same job as {seen[job_id]} (id {job_id[:12]}): model, mode, hyper, "
                                        "split_recipe, train_hosts and seed are all equal; change one of them "
                                        "(e.g. seed) or remove one entry")
                    continue
                seen[job_id] = label
                jobs.append((label, job))
        return jobs


def _job_suffix(model: str, name: str | None) -> str:
    parts = [f"model={model}"] + ([f"name={name}"] if name else [])
    return f" ({', '.join(parts)})"


def _cycles(graph: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """Cycles found by a depth-first walk in insertion order, each closed (first name repeated last)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    found = []
    for root in graph:
        if root in state:
            continue
        path = [root]
        stack = [iter(graph[root])]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                state[path.pop()] = 2
            elif state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    return found
