"""The worker's settings: flags over the environment over worker.toml over defaults, each value checked once.

Reads worker.toml and the arguments; never contacts the coordinator.
"""

from __future__ import annotations

import argparse
import difflib
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cis490fleet import errors
from cis490fleet.model import HOST_ID_RE

DEFAULT_CONFIG = (Path(os.environ.get("ProgramData", r"C:\ProgramData")) / "cis490fleet" / "worker.toml"
                  if os.name == "nt" else Path("/etc/cis490fleet/worker.toml"))
CONFIG_KEYS = ("receiver", "host_id", "work_dir", "slots", "grace_s", "wait_s", "ca", "cert", "key", "capability",
               "host_key_file")
ENV_HOST_KEY_FILE = "CIS490_HOST_KEY_FILE"


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
    host_key: bytes | None = field(default=None, repr=False)  # signs every request; never sent, never logged


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
                        once=args.once, exit_when_idle_s=args.exit_when_idle,
                        host_key=_host_key(getattr(args, "host_key_file", None), env, file, src), **tls)


def _host_key(flag: str | None, env: dict[str, str], file: dict, src: str) -> bytes | None:
    """The host key from --host-key-file, else CIS490_HOST_KEY_FILE, else host_key_file in worker.toml."""
    from cis490fleet import signing

    for where, path in (("--host-key-file", flag), (ENV_HOST_KEY_FILE, env.get(ENV_HOST_KEY_FILE)),
                        (f"{src}: host_key_file", file.get("host_key_file"))):
        if path:
            if not isinstance(path, str):
                raise errors.ConfigError(f"{where}: expected a file path, got {path!r}")
            try:
                text = Path(path).read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as err:
                raise errors.ConfigError(f"{where} {path}: cannot read the host key ({err}); `jobs hosts add HOST` "
                                         "prints the key to put there") from None
            return signing.parse_key(text, f"{where} {path}")
    return None


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
    p.add_argument("--host-key-file", metavar="FILE",
                   help=f"this host's key from `jobs hosts add` (else ${ENV_HOST_KEY_FILE}); every request is signed "
                   "with it")
    p.add_argument("--grace", type=float, help="seconds between SIGTERM and SIGKILL for a trainer (default 30)")
    p.add_argument("--wait", type=float, help="claim long-poll seconds (default 20)")
    p.add_argument("--once", action="store_true", help="exit when the queue has nothing for this host")
    p.add_argument("--exit-when-idle", type=float, metavar="S", help="exit after S seconds without a job")
    return p.parse_args(argv)
