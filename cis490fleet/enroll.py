"""`enroll`: install this very zipapp as a service on this host (systemd unit or Windows Scheduled Task), and remove it.

Shell. One run checks the host (Python, capability, the coordinator over the
configured TLS), copies the running pyz to a fixed place, writes the config and
the service definition, enables the service and registers the host. Re-running
upgrades the pyz, keeps an existing config and rewrites units only when they
change. ``--dry-run`` and ``--root`` (a staging tree) never run a system
command; they print it. What enroll wrote is listed in an ``enrolled-<kind>.json``
record next to the pyz, so ``enroll uninstall`` removes exactly that; data folders
go only with ``--purge``.

The unit and task templates here are the single source of the files under
``systemd/`` in the repository (a test compares them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Callable
from xml.sax.saxutils import escape

from cis490fleet import errors
from cis490fleet.model import HOST_ID_RE

log = logging.getLogger(__name__)

MIN_PYTHON = (3, 11)
SERVICE_USER = "cis490fleet"
WINDOWS_ACCOUNT = r"NT AUTHORITY\NETWORK SERVICE"
LINUX_PYTHON = "/usr/bin/python3"
DEFAULT_GRACE_S = 30
STOP_MARGIN_S = 15  # the worker's own shutdown (release calls) after its trainers' grace period
WATCHDOG_S = 30
COORDINATOR_STOP_S = 30
DEFAULT_BIND = "127.0.0.1:8445"
TASK_NAME = "cis490fleet-worker"
GPU_GROUPS = ("video", "render")
KINDS = ("worker", "coordinator")
# Well-known Windows service accounts: they log on without a password (LogonType ServiceAccount).
WINDOWS_SERVICE_SIDS = {
    "nt authority\\system": "S-1-5-18", "system": "S-1-5-18",
    "nt authority\\local service": "S-1-5-19", "nt authority\\localservice": "S-1-5-19",
    "nt authority\\network service": "S-1-5-20", "nt authority\\networkservice": "S-1-5-20",
}
LINUX_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")
# Paths end up in unit files and an EnvironmentFile, where these characters would need quoting rules.
UNSAFE_PATH_RE = re.compile(r"[\s\"'\\$%;`]")


# -- layout -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where things go on the target system (paths as the installed service sees them)."""

    system: str  # "linux" or "windows"
    base: PurePath  # the pyz and the enrollment records
    etc: PurePath  # configs, certificates
    state: PurePath  # data folders
    unit_dir: PurePath | None

    @property
    def pyz(self) -> PurePath:
        return self.base / "cis490fleet.pyz"

    def record(self, kind: str) -> PurePath:
        return self.base / f"enrolled-{kind}.json"

    def unit(self, kind: str) -> PurePath:
        return self.unit_dir / f"cis490fleet-{kind}.service"

    @property
    def task_xml(self) -> PurePath:
        return self.base / f"{TASK_NAME}.xml"

    @property
    def worker_config(self) -> PurePath:
        return self.etc / "worker.toml"

    @property
    def host_key_file(self) -> PurePath:
        """The host's signing key (from `jobs hosts add`), read by `work --host-key-file`."""
        return self.etc / "host-signing.key"

    @property
    def cluster_key_file(self) -> PurePath:
        """The key the coordinator peers share, read by `serve --cluster-key-file`."""
        return self.etc / "cluster.key"

    @property
    def coordinator_env(self) -> PurePath:
        return self.etc / "coordinator.env"

    @property
    def work_dir(self) -> PurePath:
        return self.state / "work"

    @property
    def data_dir(self) -> PurePath:
        return self.state / "data"


def layout_for(system: str, program_data: str | None = None) -> Layout:
    if system == "windows":
        base = PureWindowsPath(program_data or os.environ.get("ProgramData") or r"C:\ProgramData") / "cis490fleet"
        return Layout("windows", base, base, base, None)
    return Layout("linux", PurePosixPath("/opt/cis490fleet"), PurePosixPath("/etc/cis490fleet"),
                  PurePosixPath("/var/lib/cis490fleet"), PurePosixPath("/etc/systemd/system"))


LINUX = layout_for("linux")


# -- templates ----------------------------------------------------------------------------------


def stop_timeout_s(grace_s: float) -> int:
    return int(math.ceil(grace_s)) + STOP_MARGIN_S


# Character-device classes (/proc/devices names) a trainer needs for CUDA (NVIDIA) and ROCm (AMD) GPUs.
GPU_DEVICES = ("char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps", "char-drm", "char-kfd")


def _hardening(state: PurePath, data: PurePath) -> str:
    """The sandbox both units share: read-only system and no homes, writes to the state and data folders only,
    no capabilities, no kernel tunables, modules, logs or clock, system calls of an ordinary service only.
    ``systemd-analyze security --offline`` scores both units at most 4.0 (a test checks it)."""
    writable = [str(state)] + ([] if _under(data, state) else [str(data)])
    return (f"NoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\n"
            f"StateDirectory=cis490fleet\nStateDirectoryMode=0750\nReadWritePaths={' '.join(writable)}\n"
            "CapabilityBoundingSet=\nAmbientCapabilities=\nProtectKernelTunables=yes\nProtectKernelModules=yes\n"
            "ProtectKernelLogs=yes\nProtectControlGroups=yes\nProtectClock=yes\nProtectHostname=yes\n"
            "ProtectProc=invisible\nRestrictNamespaces=yes\nRestrictRealtime=yes\nRestrictSUIDSGID=yes\n"
            "LockPersonality=yes\nRemoveIPC=yes\nSystemCallArchitectures=native\n"
            "SystemCallFilter=@system-service\nSystemCallErrorNumber=EPERM")


def render_worker_unit(*, python: str = LINUX_PYTHON, pyz: PurePath = LINUX.pyz,
                       config: PurePath = LINUX.worker_config, user: str = SERVICE_USER,
                       grace_s: float = DEFAULT_GRACE_S, work_dir: PurePath = LINUX.work_dir,
                       state: PurePath = LINUX.state, host_key_file: PurePath | None = None) -> str:
    key_arg = f" --host-key-file {host_key_file}" if host_key_file else ""
    return f"""\
# Written by `cis490fleet enroll worker`; enroll rewrites it when it changes.
[Unit]
Description=cis490fleet worker (trains jobs handed out by the fleet coordinator)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
ExecStart={python} {pyz} work --config {config}{key_arg}
Restart=on-failure
RestartSec=10
Environment=PYTHONUNBUFFERED=1
# SIGTERM goes to the worker alone: it stops its trainers (grace_s = {_num(grace_s)} s), hands their
# jobs back, then exits. Whatever is left gets SIGKILL after TimeoutStopSec.
KillMode=mixed
TimeoutStopSec={stop_timeout_s(grace_s)}
{_hardening(state, work_dir)}
UMask=0027
# Trainers may use torch.distributed (gloo finds interfaces over netlink) and JIT compilers
# (writable executable memory), so neither is refused here.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
# GPUs stay reachable and nothing else: enroll adds the user to whichever of the video
# and render groups the host has.
DevicePolicy=closed
{chr(10).join(f"DeviceAllow={device} rw" for device in GPU_DEVICES)}

[Install]
WantedBy=multi-user.target
"""


def render_coordinator_unit(*, python: str = LINUX_PYTHON, pyz: PurePath = LINUX.pyz,
                            env_file: PurePath = LINUX.coordinator_env, user: str = SERVICE_USER,
                            data_dir: PurePath = LINUX.data_dir, state: PurePath = LINUX.state) -> str:
    return f"""\
# Written by `cis490fleet enroll coordinator`; enroll rewrites it when it changes.
# Options of `serve` live in {env_file}.
[Unit]
Description=cis490fleet coordinator (job queue, artifact store, HTTP API)
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
WatchdogSec={WATCHDOG_S}
User={user}
EnvironmentFile={env_file}
ExecStart={python} {pyz} serve --data {data_dir} $CIS490FLEET_SERVE_ARGS
Restart=on-failure
RestartSec=5
Environment=PYTHONUNBUFFERED=1
KillMode=mixed
TimeoutStopSec={COORDINATOR_STOP_S}
{_hardening(state, data_dir)}
UMask=0077
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
PrivateDevices=yes
ProcSubset=pid
MemoryDenyWriteExecute=yes
SystemCallFilter=~@privileged @resources

[Install]
WantedBy=multi-user.target
"""


def render_coordinator_env(serve_args: list[str], env_file: PurePath = LINUX.coordinator_env) -> str:
    return (f"# Options of `cis490fleet serve`, written by `cis490fleet enroll coordinator`; enroll keeps this file\n"
            f"# once it exists. After editing: systemctl restart cis490fleet-coordinator\n"
            f"CIS490FLEET_SERVE_ARGS={' '.join(serve_args)}\n")


def windows_principal(account: str) -> tuple[str, str]:
    """(UserId, LogonType) of the task's principal: a built-in service account, else S4U (no stored password)."""
    sid = WINDOWS_SERVICE_SIDS.get(account.strip().lower())
    return (sid, "ServiceAccount") if sid else (account, "S4U")


def windows_secret_acl(path: str, reader: str | None) -> list[str]:
    """icacls arguments that leave ``path`` to SYSTEM and Administrators (full) and ``reader`` (read) only:
    inheritance off, every inherited entry gone."""
    argv = ["icacls", path, "/inheritance:r", "/grant:r", "*S-1-5-18:(F)", "/grant:r", "*S-1-5-32-544:(F)"]
    if reader:
        sid = WINDOWS_SERVICE_SIDS.get(reader.strip().lower())
        argv += ["/grant:r", f"*{sid}:(R)" if sid else f"{reader}:(R)"]
    return argv


def render_task_xml(*, python: str, pyz: PurePath, config: PurePath, working_dir: PurePath,
                    account: str = WINDOWS_ACCOUNT, name: str = TASK_NAME,
                    host_key_file: PurePath | None = None) -> str:
    """Task Scheduler 1.2 definition: start at boot, restart on failure, and a 5-minute
    repetition that starts the worker again if it ever exited (IgnoreNew keeps one instance)."""
    user_id, logon = windows_principal(account)
    arguments = subprocess.list2cmdline([str(pyz), "work", "--config", str(config)]
                                        + (["--host-key-file", str(host_key_file)] if host_key_file else []))
    return f"""\
<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>cis490fleet worker (written by cis490fleet enroll worker)</Description>
    <URI>\\{escape(name)}</URI>
  </RegistrationInfo>
  <Triggers>
    <BootTrigger>
      <Enabled>true</Enabled>
    </BootTrigger>
    <TimeTrigger>
      <StartBoundary>2024-01-01T00:00:00</StartBoundary>
      <Enabled>true</Enabled>
      <Repetition>
        <Interval>PT5M</Interval>
        <StopAtDurationEnd>false</StopAtDurationEnd>
      </Repetition>
    </TimeTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      <UserId>{escape(user_id)}</UserId>
      <LogonType>{logon}</LogonType>
      <RunLevel>LeastPrivilege</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <AllowHardTerminate>true</AllowHardTerminate>
    <StartWhenAvailable>true</StartWhenAvailable>
    <RunOnlyIfNetworkAvailable>false</RunOnlyIfNetworkAvailable>
    <IdleSettings>
      <StopOnIdleEnd>false</StopOnIdleEnd>
      <RestartOnIdle>false</RestartOnIdle>
    </IdleSettings>
    <AllowStartOnDemand>true</AllowStartOnDemand>
    <Enabled>true</Enabled>
    <Hidden>false</Hidden>
    <RunOnlyIfIdle>false</RunOnlyIfIdle>
    <WakeToRun>false</WakeToRun>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <Priority>7</Priority>
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>999</Count>
    </RestartOnFailure>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{escape(python)}</Command>
      <Arguments>{escape(arguments)}</Arguments>
      <WorkingDirectory>{escape(str(working_dir))}</WorkingDirectory>
    </Exec>
  </Actions>
</Task>
"""


# -- a tiny TOML writer (tomllib only reads) ----------------------------------------------------

_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.match(key) else _toml_string(key)


def _toml_string(s: str) -> str:
    # JSON's escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"TOML has no finite encoding for {v!r}")
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as a TOML value")


def toml_dumps(doc: dict, header: str = "") -> str:
    """``doc`` (scalars, lists, one level of tables) as TOML that ``tomllib.loads`` reads back equal."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if k not in tables]
    for name, table in tables.items():
        lines += ["", f"[{_toml_key(name)}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != doc:
        raise errors.FleetError(f"internal error: the TOML writer does not round-trip {doc!r}")
    return text


# -- validation at the edge ---------------------------------------------------------------------


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _under(path: PurePath, parent: PurePath) -> bool:
    return path == parent or parent in path.parents


def check_python(version_info=sys.version_info, what: str = "this Python") -> None:
    if tuple(version_info[:2]) < MIN_PYTHON:
        have = ".".join(str(x) for x in version_info[:3])
        raise errors.ConfigError(f"cis490fleet needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}; {what} is {have}. "
                                 "Install a newer python3 and run enroll with it")


def _target_path(layout: Layout, raw: str, flag: str) -> PurePath:
    path = PureWindowsPath(raw) if layout.system == "windows" else PurePosixPath(raw)
    if not path.is_absolute():
        raise errors.ConfigError(f"{flag} {raw!r} must be an absolute path")
    if layout.system == "linux" and UNSAFE_PATH_RE.search(raw):
        raise errors.ConfigError(f"{flag} {raw!r} holds a space, quote or shell character; pick a plain path")
    return path


def _source_file(raw: str | None, flag: str) -> Path | None:
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.is_file():
        raise errors.ConfigError(f"{flag} {raw!r} does not exist or is not a file; pass an existing file")
    return path.resolve()


def _check_user(layout: Layout, user: str) -> str:
    if layout.system == "linux" and not LINUX_USER_RE.match(user):
        raise errors.ConfigError(f"--user {user!r} is not a valid Linux user name (lowercase letters, digits, '_' "
                                 "and '-', at most 31, starting with a letter or '_')")
    if layout.system == "windows" and (not user.strip() or re.search(r"[\"<>|\x00-\x1f]", user)):
        raise errors.ConfigError(f"--user {user!r} is not a Windows account name (e.g. {WINDOWS_ACCOUNT!r})")
    return user


def parse_bind(raw: str) -> tuple[str, int]:
    """``serve``'s own reading of --bind, so enroll refuses what the service would; a service needs a fixed port."""
    from cis490fleet.coordinator import parse_bind as serve_parse_bind

    host, port = serve_parse_bind(raw)
    if port == 0:
        raise errors.ConfigError(f"--bind {raw!r}: a service needs a fixed port that workers can be told, "
                                 "e.g. 0.0.0.0:8445")
    return host, port


# -- the installer: every file and command goes through here ------------------------------------


class Installer:
    """Writes files and runs commands, or only says it would (``dry_run``), or stages under ``root``."""

    def __init__(self, *, layout: Layout, root: Path | None, dry_run: bool, out: Callable[[str], None] = print):
        self.layout = layout
        self.root = root
        self.dry_run = dry_run
        self.out = out
        self.written: list[str] = []  # targets written by this run
        self.updated: list[str] = []  # ... of which existed before (the running service may need a restart)

    def host(self, target: PurePath) -> Path:
        if self.root is None:
            return Path(target)
        return self.root.joinpath(*target.parts[1:])

    def _cmdline(self, argv: list[str]) -> str:
        return subprocess.list2cmdline(argv) if self.layout.system == "windows" else shlex.join(argv)

    def _fail(self, what: str, target: PurePath, err: OSError) -> errors.FleetError:
        hint = ("run enroll as root (sudo) or as an administrator, or stage with --root DIR"
                if isinstance(err, PermissionError) else "check the path and the disk")
        return errors.FleetError(f"cannot {what} {target}: {err.strerror or err}; {hint}")

    def read(self, target: PurePath) -> bytes | None:
        try:
            return self.host(target).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise self._fail("read", target, err) from None

    def put(self, target: PurePath, data: bytes, *, mode: int = 0o644, keep: bool = False,
            group: str | None = None, note: str = "", secret: bool = False) -> str:
        """Write ``data`` atomically; returns "created", "updated", "unchanged" or "kept".

        The temporary file is created with its final mode (and group) before a byte is written, so a
        secret is never readable by others, not even for a moment. On Windows a ``secret`` gets an
        ACL first: SYSTEM and Administrators, plus ``group`` (the task's account) to read it.
        """
        old = self.read(target)
        if old is not None and keep:
            self.out(f"kept {target} (it exists; enroll does not change it{note})")
            return "kept"
        if old == data:
            self.out(f"unchanged {target}")
            return "unchanged"
        verb = "created" if old is None else "updated"
        shown = f"mode {mode:04o}" + (f", group {group}" if group and self.layout.system == "linux" else "")
        if self.dry_run:
            self.out(f"would write {target} ({len(data)} bytes, {shown})")
            return verb
        path = self.host(target)
        tmp = path.with_name(f".{path.name}.enroll-{os.getpid()}")
        linux = self.layout.system == "linux"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         mode if linux else 0o600)
            with open(fd, "wb") as f:
                if linux and hasattr(os, "fchmod"):
                    os.fchmod(fd, mode)  # the umask may have narrowed it
                    if group and self.root is None:
                        import grp

                        os.fchown(fd, 0, grp.getgrnam(group).gr_gid)
                if secret and not linux:
                    self.run(windows_secret_acl(str(tmp), group))
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, KeyError, errors.FleetError) as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, errors.FleetError):
                raise
            raise self._fail("write", target, err if isinstance(err, OSError) else OSError(str(err))) from None
        self.written.append(str(target))
        if verb == "updated":
            self.updated.append(str(target))
        self.out(f"{verb} {target} ({shown})")
        return verb

    def mkdir(self, target: PurePath, *, owner: str | None = None, mode: int = 0o750) -> bool:
        path = self.host(target)
        if path.is_dir():
            return False
        if self.dry_run:
            self.out(f"would create folder {target}")
            return True
        try:
            path.mkdir(parents=True, exist_ok=True)
            if self.layout.system == "linux":
                os.chmod(path, mode)
                if owner and self.root is None:
                    import pwd

                    pw = pwd.getpwnam(owner)
                    os.chown(path, pw.pw_uid, pw.pw_gid)
        except (OSError, KeyError) as err:
            raise self._fail("create folder", target, err if isinstance(err, OSError) else OSError(str(err))) from None
        self.out(f"created folder {target}")
        return True

    def run(self, argv: list[str], *, ignore_failure: bool = False) -> bool:
        line = self._cmdline(argv)
        if self.dry_run:
            self.out(f"would run: {line}")
            return True
        if self.root is not None:
            self.out(f"not run (staging root; run it on the target host): {line}")
            return True
        self.out(f"run: {line}")
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            if ignore_failure:
                return False
            raise errors.FleetError(f"{line} could not run: {err}") from None
        if proc.returncode != 0:
            if ignore_failure:
                return False
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise errors.FleetError(f"{line} failed (exit {proc.returncode}): {said[-1] if said else 'no message'}")
        return True

    def remove(self, target: PurePath) -> bool:
        path = self.host(target)
        if not path.is_file() and not path.is_symlink():
            return False
        if self.dry_run:
            self.out(f"would remove {target}")
            return True
        try:
            path.unlink()
        except OSError as err:
            raise self._fail("remove", target, err) from None
        self.out(f"removed {target}")
        return True

    def remove_tree(self, target: PurePath) -> bool:
        path = self.host(target)
        if not path.is_dir():
            return False
        if self.dry_run:
            self.out(f"would remove folder {target} and everything in it")
            return True
        import shutil

        try:
            shutil.rmtree(path)
        except OSError as err:
            raise self._fail("remove", target, err) from None
        self.out(f"removed folder {target}")
        return True

    def prune(self, target: PurePath) -> None:
        """Remove ``target`` when empty; under a staging root, its empty parents too."""
        path = self.host(target)
        while path.is_dir() and not any(path.iterdir()):
            if self.dry_run:
                self.out(f"would remove empty folder {target}")
                return
            try:
                path.rmdir()
            except OSError:
                return
            if self.root is None:
                return
            path = path.parent
            if path == self.root or self.root not in path.parents:
                return


# -- records: what enroll wrote, for uninstall --------------------------------------------------


def read_record(inst: Installer, kind: str) -> dict | None:
    data = inst.read(inst.layout.record(kind))
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        raise errors.ConfigError(f"{inst.layout.record(kind)} is not valid JSON; fix or remove it") from None
    return record if isinstance(record, dict) else None


def write_record(inst: Installer, kind: str, previous: dict | None, *, files: list[str], dirs: list[str],
                 user: str, user_created: bool) -> None:
    prev = previous or {}
    record = {
        "kind": kind,
        "files": sorted(set(prev.get("files", [])) | set(files)),
        "data_dirs": sorted(set(prev.get("data_dirs", [])) | set(dirs)),
        "user": prev.get("user") or user,
        "user_created": bool(prev.get("user_created")) or user_created,
    }
    inst.put(inst.layout.record(kind), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


# -- host checks --------------------------------------------------------------------------------


def detect_capability(overrides: dict, work_dir: Path | None) -> dict:
    from cis490fleet import capability

    probe_dir = work_dir
    while probe_dir is not None and not probe_dir.exists():
        probe_dir = probe_dir.parent if probe_dir.parent != probe_dir else None
    return capability.detect(overrides, work_dir=str(probe_dir) if probe_dir else None)


def report_capability(cap: dict, out: Callable[[str], None], service_python: tuple[bool, str | None]) -> None:
    out("capability: " + json.dumps(cap, sort_keys=True))
    checked, service_torch = service_python
    torch = service_torch if checked else cap.get("torch")
    whose = "the service python" if checked else "this Python"
    if torch:
        out(f"torch: {torch} ({whose})")
    else:
        out(f"warning: torch is not installed for {whose}; jobs whose trainer needs torch "
            "(the built-in `train`) will fail on this host until it is (pip install torch)")


def diagnose(url: str, ca: str | None, cert: str | None, key: str | None, timeout: float = 10.0) -> str | None:
    """Walk DNS, connect, TLS handshake, certificate verify and HTTP status for ``url``/v1/health;
    the first step that fails as one phrase, or None when every step passes."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        return f"DNS: cannot resolve {host!r} ({getattr(err, 'strerror', None) or err}); check the host name"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        return (f"connect: nothing answers on {host}:{port} ({err.strerror or err}); "
                "check that serve runs there and that no firewall blocks the port")
    try:
        if parts.scheme == "https":
            from cis490fleet import tls

            ctx = tls.client_context(ca, cert, key)
            try:
                sock = ctx.wrap_socket(sock, server_hostname=host)
            except ssl.SSLCertVerificationError as err:
                return (f"certificate verify: {err.verify_message}; pass the CA that signed the coordinator's "
                        "certificate with --ca (and use the name in its certificate in the URL)")
            except (ssl.SSLError, OSError) as err:
                return f"TLS handshake: {err}; is the coordinator serving https on this port?"
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        try:
            conn.request("GET", parts.path.rstrip("/") + "/v1/health", headers={"accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read(1 << 16)
        except ssl.SSLError as err:
            return (f"TLS handshake: the coordinator refused this host's client certificate ({err}); "
                    "pass a certificate its client CA signed with --cert/--key")
        except (OSError, http.client.HTTPException) as err:
            hint = "; it may expect https://" if parts.scheme == "http" else ""
            return f"HTTP: no valid answer to GET /v1/health ({type(err).__name__}: {err}){hint}"
        if resp.status != 200:
            return f"HTTP status: GET /v1/health answered {resp.status} {resp.reason}"
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or "ok" not in doc:
            return "HTTP: /v1/health did not answer cis490fleet JSON; is this URL a cis490fleet coordinator?"
        return None
    finally:
        sock.close()


def check_coordinator(receivers: tuple[str, ...], host_id: str, tls_files: dict, out: Callable[[str], None]) -> None:
    """At least one receiver must answer /v1/health over the configured TLS; each failure names its step."""
    from cis490fleet.client import Client

    failures = []
    for url in receivers:
        try:
            with Client(url, host_id=host_id, timeout=10.0, retries=0, **tls_files) as client:
                health = client.health()
        except (errors.FleetError, OSError) as err:
            step = diagnose(url, **tls_files) or str(err)
            failures.append(f"{url}: {step}")
            continue
        out(f"coordinator {url}: ok (role {health.get('role', '?')}, leader {health.get('leader', '?')})")
    if len(failures) == len(receivers):
        raise errors.Unavailable("coordinator check failed: " + " | ".join(failures)
                                 + " (or pass --skip-coordinator-check to install anyway)")
    for failure in failures:
        out(f"warning: coordinator {failure}")


_PYTHON_PROBE = (
    "import sys, importlib.metadata as m\n"
    "try:\n    torch = m.version('torch')\nexcept m.PackageNotFoundError:\n    torch = ''\n"
    "print('%d.%d.%d' % sys.version_info[:3], torch)\n"
)


def check_service_python(inst: Installer, python: str) -> tuple[bool, str | None]:
    """(checked, torch version) of the interpreter the service will run; it must be >= 3.11."""
    if inst.root is not None or inst.layout.system != sys_platform():
        inst.out(f"service python: {python} (not checked: it runs on the target host)")
        return False, None
    hint = f"pass --python with a Python >= 3.11 (e.g. --python {_base_python()})"
    try:
        proc = subprocess.run([python, "-c", _PYTHON_PROBE], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise errors.ConfigError(f"service python {python} cannot run ({err}); {hint}") from None
    words = proc.stdout.split()
    try:
        version = tuple(int(x) for x in words[0].split("."))
    except (ValueError, IndexError):
        said = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise errors.ConfigError(f"service python {python} did not say its version ({said}); {hint}") from None
    check_python(version, f"the service python {python} (choose another with --python)")
    inst.out(f"service python: {python} {'.'.join(map(str, version))}")
    return True, (words[1] if len(words) > 1 else None)


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def sys_platform() -> str:
    return "windows" if os.name == "nt" else "linux"


# -- the pyz ------------------------------------------------------------------------------------


def running_pyz() -> Path | None:
    """The zipapp this process runs from, or None when it runs from a source tree."""
    import cis490fleet

    loader = getattr(getattr(cis490fleet, "__spec__", None), "loader", None)
    archive = getattr(loader, "archive", None)
    if archive and Path(archive).is_file():
        return Path(archive)
    return None


MAX_PYZ_BYTES = 512 << 20


def check_sha256(raw: str | None) -> str | None:
    if raw is None:
        return None
    pin = raw.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", pin):
        raise errors.ConfigError(f"--zipapp-sha256 {raw!r} is not a sha256 (64 hex digits); copy it from "
                                 "`jobs hosts add` or `sha256sum cis490fleet.pyz`")
    return pin


def download_pyz(url: str, *, insecure: bool, ca: Path | None) -> bytes:
    """The zipapp at ``url``: https:// (verified), or http:// only when ``insecure``."""
    import urllib.error
    import urllib.request

    if url.startswith("http://") and not insecure:
        raise errors.ConfigError(f"--pyz {url}: refusing a plain http:// download, which anyone on the path can "
                                 "change; use the coordinator's https:// URL, or add --insecure on a trusted "
                                 "network (the --zipapp-sha256 pin still checks the bytes)")
    context = None
    if url.startswith("https://"):
        from cis490fleet import tls

        context = tls.client_context(str(ca) if ca else None)
    try:
        with urllib.request.urlopen(url, timeout=60, context=context) as resp:
            data = resp.read(MAX_PYZ_BYTES + 1)
    except (OSError, urllib.error.URLError, ValueError) as err:
        raise errors.Unavailable(f"cannot download the zipapp from {url} ({err}); check the URL, or copy "
                                 "cis490fleet.pyz here and pass --pyz FILE") from None
    if len(data) > MAX_PYZ_BYTES:
        raise errors.ConfigError(f"{url} sent more than {MAX_PYZ_BYTES >> 20} MiB: that is not a cis490fleet zipapp")
    return data


def pyz_bytes(explicit: str | None, *, sha256: str | None = None, insecure: bool = False,
              ca: Path | None = None) -> tuple[bytes, str]:
    """The zipapp to install and where it came from; refused unless its sha256 is ``sha256`` (when given)."""
    data, origin = _pyz_source(explicit, sha256=sha256, insecure=insecure, ca=ca)
    if sha256 is not None:
        import hashlib

        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise errors.ConfigError(f"the zipapp from {origin} has sha256 {actual}, not the pinned {sha256}; "
                                     "nothing was installed. Download it again from the coordinator, or check "
                                     "the pin that `jobs hosts add` printed")
    return data, origin


def _pyz_source(explicit: str | None, *, sha256: str | None, insecure: bool, ca: Path | None) -> tuple[bytes, str]:
    if explicit and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", explicit):
        if not explicit.startswith(("https://", "http://")):
            raise errors.ConfigError(f"--pyz {explicit}: only https:// (or, with --insecure, http://) URLs")
        if sha256 is None:
            raise errors.ConfigError(f"--pyz {explicit}: a downloaded zipapp needs --zipapp-sha256 HEX to pin it "
                                     "(`jobs hosts add` prints it)")
        return download_pyz(explicit, insecure=insecure, ca=ca), explicit
    if explicit:
        path = _source_file(explicit, "--pyz")
        return path.read_bytes(), str(path)
    path = running_pyz()
    if path is not None:
        return path.read_bytes(), str(path)
    try:
        from cis490fleet import zipbuild
    except ImportError as err:
        raise errors.ConfigError(f"this runs from a source tree and cannot build the zipapp ({err}); "
                                 "pass --pyz cis490fleet.pyz") from None
    built = zipbuild.build()
    data = built if isinstance(built, (bytes, bytearray)) else Path(built).read_bytes()
    return bytes(data), "built from this source tree"


# -- linux service plumbing ---------------------------------------------------------------------


def _user_exists(inst: Installer, user: str) -> bool:
    if inst.root is not None:
        passwd = inst.root / "etc" / "passwd"
        return passwd.is_file() and any(line.split(":", 1)[0] == user
                                        for line in passwd.read_text(errors="replace").splitlines())
    import pwd

    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def ensure_user(inst: Installer, user: str, *, gpu: bool) -> bool:
    """Create the service account when missing; True when enroll created it."""
    import grp

    groups = []
    if gpu:
        for name in GPU_GROUPS:
            try:
                groups.append(grp.getgrnam(name))
            except KeyError:
                pass
    if not _user_exists(inst, user):
        argv = ["useradd", "--system", "--user-group", "--home-dir", str(inst.layout.state), "--no-create-home",
                "--shell", "/usr/sbin/nologin"]
        if groups:
            argv += ["--groups", ",".join(g.gr_name for g in groups)]
        inst.run(argv + [user])
        return True
    missing = [g.gr_name for g in groups if user not in g.gr_mem]
    if missing and inst.root is None:
        inst.run(["usermod", "--append", "--groups", ",".join(missing), user])
    return False


def systemd_enable(inst: Installer, unit: str, *, unit_changed: bool, restart: bool, start: bool) -> None:
    if unit_changed:
        inst.run(["systemctl", "daemon-reload"])
    if restart and start:
        inst.run(["systemctl", "try-restart", unit])
    inst.run(["systemctl", "enable", "--now", unit] if start else ["systemctl", "enable", unit])


# -- install ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    receivers: tuple[str, ...]
    host_id: str
    work_dir: PurePath
    grace_s: float = DEFAULT_GRACE_S
    slots: int | None = None
    ca: PurePath | None = None
    cert: PurePath | None = None
    key: PurePath | None = None

    def to_toml_doc(self) -> dict:
        doc: dict = {"receiver": list(self.receivers), "host_id": self.host_id, "work_dir": str(self.work_dir),
                     "grace_s": _num(self.grace_s)}
        if self.slots is not None:
            doc["slots"] = self.slots
        for name in ("ca", "cert", "key"):
            if getattr(self, name) is not None:
                doc[name] = str(getattr(self, name))
        return doc


def settings_from_existing(text: bytes, path: PurePath, fallback: WorkerSettings) -> WorkerSettings:
    """The settings an existing worker.toml holds: the unit, the check and the registration follow it."""
    from cis490fleet.client import parse_urls

    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise errors.ConfigError(
            f"{path} exists but is not valid TOML ({err}); fix it or remove it and re-run") from None
    grace = doc.get("grace_s", DEFAULT_GRACE_S)
    if not isinstance(grace, (int, float)) or isinstance(grace, bool) or grace < 0:
        raise errors.ConfigError(f"{path}: grace_s must be a number >= 0, got {grace!r}")
    work_dir = doc.get("work_dir", str(fallback.work_dir))
    host_id = doc.get("host_id", fallback.host_id)
    if not isinstance(work_dir, str) or not type(fallback.work_dir)(work_dir).is_absolute():
        raise errors.ConfigError(f"{path}: work_dir must be an absolute path, got {work_dir!r}")
    if not isinstance(host_id, str) or not HOST_ID_RE.match(host_id):
        raise errors.ConfigError(f"{path}: host_id {host_id!r} is not a valid host id; fix it or remove the file")
    receivers = fallback.receivers
    if "receiver" in doc:
        raw = doc["receiver"]
        if not isinstance(raw, (str, list)) or not all(isinstance(u, str) for u in ([raw] if isinstance(raw, str)
                                                                                    else raw)):
            raise errors.ConfigError(f"{path}: receiver must be a URL or a list of URLs, got {raw!r}")
        receivers = tuple(parse_urls(raw))
    return replace(fallback, grace_s=float(grace), work_dir=type(fallback.work_dir)(work_dir), host_id=host_id,
                   receivers=receivers)


TLS_TARGETS = {
    "worker": {"ca": "ca.pem", "cert": "host.pem", "key": "host.key"},
    "coordinator": {"cert": "server.pem", "key": "server.key", "client_ca": "client-ca.pem"},
}


def install_tls_files(inst: Installer, kind: str, sources: dict[str, Path | None], group: str | None) -> dict:
    """Copy the given PEM files next to the config (the service cannot read home folders); their target paths."""
    targets = {}
    for name, src in sources.items():
        if src is None:
            continue
        target = inst.layout.etc / TLS_TARGETS[kind][name]
        secret = name == "key"
        inst.put(target, src.read_bytes(), mode=0o640 if secret else 0o644, group=group if secret else None,
                 secret=secret)
        targets[name] = target
    return targets


def read_key(raw: str | None, flag: str) -> bytes | None:
    """The key that ``flag`` names (a file, or ``-`` for standard input), checked as serve and work read it,
    as the bytes to install."""
    if raw is None:
        return None
    from cis490fleet import signing

    if raw == "-":
        text = sys.stdin.read(4096)
    else:
        try:
            text = _source_file(raw, flag).read_text(encoding="utf-8")[:4096]
        except (OSError, UnicodeDecodeError) as err:
            raise errors.ConfigError(f"{flag} {raw}: cannot read it ({err})") from None
    key = text.strip()
    signing.parse_key(key, f"{flag} {'(standard input)' if raw == '-' else raw}")
    return (key + "\n").encode()


def install_worker(args, inst: Installer) -> int:
    layout, out = inst.layout, inst.out
    user = _check_user(layout, args.user or (SERVICE_USER if layout.system == "linux" else WINDOWS_ACCOUNT))
    from cis490fleet.client import parse_urls

    receivers = tuple(parse_urls(args.receiver or []))
    host_id = args.host_id or socket.gethostname().split(".")[0]
    if not HOST_ID_RE.match(host_id):
        raise errors.ConfigError(f"host id {host_id!r} is not valid (letters, digits, '.', '_', '-', at most 63); "
                                 "pass --host-id")
    if args.slots is not None and args.slots < 1:
        raise errors.ConfigError(f"--slots must be an integer >= 1, got {args.slots}")
    if args.grace_s is not None and not (0 <= args.grace_s <= 3600):
        raise errors.ConfigError(f"--grace-s must be between 0 and 3600 seconds, got {args.grace_s:g}")
    tls_src = {name: _source_file(getattr(args, name), f"--{name}") for name in ("ca", "cert", "key")}
    if bool(tls_src["cert"]) != bool(tls_src["key"]):
        raise errors.ConfigError("a client certificate needs both --cert and --key; give both or neither")
    if any(tls_src.values()) and not any(u.startswith("https://") for u in receivers):
        raise errors.ConfigError("--ca/--cert/--key are for https:// receivers; give an https:// --receiver")
    work_dir = _target_path(layout, args.work_dir, "--work-dir") if args.work_dir else layout.work_dir
    python = args.python or (LINUX_PYTHON if layout.system == "linux" else _windows_python())
    data, origin = pyz_bytes(args.pyz, sha256=check_sha256(args.zipapp_sha256), insecure=args.insecure,
                             ca=tls_src["ca"])
    host_key = read_key(args.host_key_file, "--host-key-file")

    tls_targets = {name: layout.etc / TLS_TARGETS["worker"][name] for name, src in tls_src.items() if src}
    settings = WorkerSettings(receivers=receivers, host_id=host_id, work_dir=work_dir,
                              grace_s=args.grace_s if args.grace_s is not None else DEFAULT_GRACE_S,
                              slots=args.slots, **tls_targets)
    existing = inst.read(layout.worker_config)
    if existing is not None:
        settings = settings_from_existing(existing, layout.worker_config, settings)
        if (settings.host_id, settings.receivers) != (host_id, receivers):
            out(f"{layout.worker_config} exists and is kept: enrolling as {settings.host_id} "
                f"with {', '.join(settings.receivers)}, as it says")
        receivers, host_id = settings.receivers, settings.host_id

    service_python = check_service_python(inst, python)
    cap = detect_capability({"host": host_id, **({"slots": args.slots} if args.slots else {})},
                            inst.host(settings.work_dir))
    report_capability(cap, out, service_python)
    tls_files = {name: str(p) if p else None for name, p in tls_src.items()}
    if args.skip_coordinator_check:
        out("coordinator check skipped (--skip-coordinator-check)")
    else:
        check_coordinator(receivers, host_id, tls_files, out)

    record = read_record(inst, "worker")
    user_created = False
    if layout.system == "linux":
        user_created = ensure_user(inst, user, gpu=True)
    out(f"pyz: {origin}")
    inst.put(layout.pyz, data, mode=0o644)
    install_tls_files(inst, "worker", tls_src, user)
    if host_key is not None:
        inst.put(layout.host_key_file, host_key, mode=0o640, group=user, secret=True)
    key_file = layout.host_key_file if host_key is not None or inst.read(layout.host_key_file) else None
    config_text = toml_dumps(settings.to_toml_doc(), header=(
        "cis490fleet worker settings, written by `cis490fleet enroll worker`.\n"
        "enroll keeps this file once it exists; edit it, then restart the worker service."))
    inst.put(layout.worker_config, config_text.encode(), keep=True, note="; delete it and re-run to write a new one")
    owner = user if layout.system == "linux" else None
    created_dirs = [str(settings.work_dir)] if inst.mkdir(settings.work_dir, owner=owner) else []

    start = not args.no_start
    if layout.system == "linux":
        unit = render_worker_unit(python=python, pyz=layout.pyz, config=layout.worker_config, user=user,
                                  grace_s=settings.grace_s, work_dir=settings.work_dir, state=layout.state,
                                  host_key_file=key_file)
        unit_state = inst.put(layout.unit("worker"), unit.encode())
        systemd_enable(inst, layout.unit("worker").name, unit_changed=unit_state in ("created", "updated"),
                       restart=bool(inst.updated), start=start)
    else:
        xml = render_task_xml(python=python, pyz=layout.pyz, config=layout.worker_config, working_dir=layout.base,
                              account=user, host_key_file=key_file)
        inst.put(layout.task_xml, xml.encode("utf-16"))
        inst.run(["icacls", str(settings.work_dir), "/grant", f"{user}:(OI)(CI)M"])
        inst.run(["schtasks", "/Create", "/TN", TASK_NAME, "/XML", str(layout.task_xml), "/F"])
        if start:
            if inst.updated:
                inst.run(["schtasks", "/End", "/TN", TASK_NAME], ignore_failure=True)
            inst.run(["schtasks", "/Run", "/TN", TASK_NAME])

    write_record(inst, "worker", record, files=list(inst.written), dirs=created_dirs, user=user,
                 user_created=user_created)

    if args.skip_coordinator_check:
        out("registration skipped (--skip-coordinator-check); the worker registers itself when it starts")
    elif inst.dry_run:
        out(f"would register host {host_id} with {', '.join(receivers)}")
    else:
        register(receivers, host_id, tls_files, cap, out, host_key)
    out(("dry run: nothing was written or run" if inst.dry_run else
         f"worker enrolled as {host_id}" + ("" if start else " (not started: --no-start)")))
    return 0


def _windows_python() -> str:
    return _base_python() if os.name == "nt" else "python.exe"


def register(receivers, host_id: str, tls_files: dict, cap: dict, out, host_key: bytes | None = None) -> None:
    """Register the host, its request signed with ``host_key`` (the key file's bytes) when given."""
    from cis490fleet.client import Client

    key = host_key.decode().strip() if host_key is not None else None
    try:
        with Client(list(receivers), host_id=host_id, timeout=10.0, retries=1, host_key=key,
                    **tls_files) as client:
            client.register(cap)
    except errors.FleetError as err:
        # Same class (so the same exit code), with what was already done in front.
        detail = (f"installed, but registering {host_id} failed: {err}; "
                  "the worker registers itself when it starts")
        err.args, err.detail = (detail,), detail
        raise err from None
    out(f"registered {host_id} with {', '.join(receivers)}")


def install_coordinator(args, inst: Installer) -> int:
    layout, out = inst.layout, inst.out
    if layout.system != "linux":
        raise errors.ConfigError("enroll coordinator installs a systemd service (Linux); on Windows run "
                                 "`serve` by hand or under a Scheduled Task of your own")
    user = _check_user(layout, args.user or SERVICE_USER)
    bind_host, _ = parse_bind(args.bind)
    cert, key = _source_file(args.cert, "--cert"), _source_file(args.key, "--key")
    client_ca = _source_file(args.client_ca, "--client-ca")
    if bool(cert) != bool(key):
        raise errors.ConfigError("TLS needs both --cert and --key; give both or neither")
    if client_ca and not cert:
        raise errors.ConfigError("--client-ca (mutual TLS) needs --cert and --key for the server side")
    from cis490fleet.coordinator import is_loopback

    if not is_loopback(bind_host) and not cert and not args.insecure:
        raise errors.ConfigError(f"--bind {args.bind} is reachable from other hosts: give --cert/--key "
                                 "(and --client-ca), or --insecure on a trusted network")
    manifest_src = _source_file(args.manifest, "--manifest")
    if manifest_src is not None:
        from cis490fleet import manifest

        manifest.load(manifest_src)  # ManifestError lists every problem
    token_src = _source_file(args.operator_token_file, "--operator-token-file")
    cluster_key = read_key(args.cluster_key_file, "--cluster-key-file")
    data_dir = _target_path(layout, args.data, "--data") if args.data else layout.data_dir
    python = args.python or LINUX_PYTHON
    data, origin = pyz_bytes(args.pyz, sha256=check_sha256(args.zipapp_sha256), insecure=args.insecure)

    report_capability(detect_capability({}, inst.host(data_dir)), out, check_service_python(inst, python))

    record = read_record(inst, "coordinator")
    user_created = ensure_user(inst, user, gpu=False)
    out(f"pyz: {origin}")
    inst.put(layout.pyz, data, mode=0o644)
    tls_targets = install_tls_files(inst, "coordinator", {"cert": cert, "key": key, "client_ca": client_ca}, user)

    manifest_target = layout.etc / "training_manifest.toml"
    if manifest_src is not None:
        inst.put(manifest_target, manifest_src.read_bytes(), keep=True,
                 note="; edit it in place and run `jobs reload`")
    token_target = layout.etc / "operator.token"
    if token_src is not None:
        inst.put(token_target, token_src.read_bytes(), mode=0o640, group=user, keep=True, secret=True)
    elif inst.read(token_target) is None:
        import secrets

        inst.put(token_target, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o640, group=user, secret=True)
    if cluster_key is not None:
        inst.put(layout.cluster_key_file, cluster_key, mode=0o640, group=user, secret=True)
    serve_args = ["--bind", args.bind, "--operator-token-file", str(token_target)]
    if manifest_src is not None or inst.read(manifest_target) is not None:
        serve_args += ["--manifest", str(manifest_target)]
    for flag, name in (("--cert", "cert"), ("--key", "key"), ("--client-ca", "client_ca")):
        if name in tls_targets:
            serve_args += [flag, str(tls_targets[name])]
    if args.insecure:
        serve_args.append("--insecure")
    cluster_arg = f"--cluster-key-file {layout.cluster_key_file}"
    if cluster_key is not None or inst.read(layout.cluster_key_file) is not None:
        serve_args += ["--cluster-key-file", str(layout.cluster_key_file)]
    env_state = inst.put(layout.coordinator_env, render_coordinator_env(serve_args).encode(), keep=True,
                         note="; edit it, then restart the coordinator service")
    if (cluster_key is not None and env_state == "kept"
            and cluster_arg.encode() not in (inst.read(layout.coordinator_env) or b"")):
        out(f"warning: serve does not read the cluster key yet: add {cluster_arg} to CIS490FLEET_SERVE_ARGS in "
            f"{layout.coordinator_env}, then systemctl restart cis490fleet-coordinator")
    created_dirs = [str(data_dir)] if inst.mkdir(data_dir, owner=user) else []

    unit = render_coordinator_unit(python=python, pyz=layout.pyz, env_file=layout.coordinator_env, user=user,
                                   data_dir=data_dir, state=layout.state)
    unit_state = inst.put(layout.unit("coordinator"), unit.encode())
    start = not args.no_start
    systemd_enable(inst, layout.unit("coordinator").name, unit_changed=unit_state in ("created", "updated"),
                   restart=bool(inst.updated), start=start)
    write_record(inst, "coordinator", record, files=list(inst.written), dirs=created_dirs, user=user,
                 user_created=user_created)
    out(f"operator token: {token_target} (give it to `jobs` as CIS490_OPERATOR_TOKEN)")
    out("dry run: nothing was written or run" if inst.dry_run else
        "coordinator enrolled" + ("" if start else " (not started: --no-start)"))
    return 0


# -- uninstall ----------------------------------------------------------------------------------


def enrolled_kinds(inst: Installer) -> list[str]:
    layout = inst.layout
    found = []
    for kind in KINDS:
        if inst.read(layout.record(kind)) is not None:
            found.append(kind)
        elif layout.system == "linux" and inst.read(layout.unit(kind)) is not None:
            found.append(kind)
        elif layout.system == "windows" and kind == "worker" and inst.read(layout.task_xml) is not None:
            found.append(kind)
    return found


def default_files(layout: Layout, kind: str) -> list[PurePath]:
    """What enroll writes by default: used when the record is gone."""
    if kind == "worker":
        files = [layout.worker_config, layout.host_key_file] + [layout.etc / n for n in TLS_TARGETS["worker"].values()]
        files.append(layout.unit("worker") if layout.system == "linux" else layout.task_xml)
        return files
    return [layout.coordinator_env, layout.etc / "operator.token", layout.cluster_key_file,
            layout.unit("coordinator")] + [
        layout.etc / n for n in TLS_TARGETS["coordinator"].values()]


def uninstall(args, inst: Installer) -> int:
    layout, out = inst.layout, inst.out
    present = enrolled_kinds(inst)
    kinds = [k for k in ([args.kind] if args.kind else present) if k in present]
    if not kinds and not args.purge:
        out(f"nothing to uninstall: no {args.kind or 'cis490fleet'} enrollment found")
        return 0
    remaining = [k for k in present if k not in kinds]
    remove_user = None
    purge_dirs: dict[str, list[str]] = {}
    for kind in kinds:
        record = read_record(inst, kind)
        purge_dirs[kind] = (record or {}).get("data_dirs") or []
        service = layout.unit(kind) if layout.system == "linux" else layout.task_xml
        if layout.system == "linux":
            inst.run(["systemctl", "disable", "--now", service.name], ignore_failure=True)
            if inst.remove(service):
                inst.run(["systemctl", "daemon-reload"])
            inst.run(["systemctl", "reset-failed", service.name], ignore_failure=True)
        else:
            inst.run(["schtasks", "/End", "/TN", TASK_NAME], ignore_failure=True)
            inst.run(["schtasks", "/Delete", "/TN", TASK_NAME, "/F"], ignore_failure=True)
            inst.remove(service)
        if record is not None:
            targets = [_as_target(layout, f) for f in record.get("files", [])]
        else:
            out(f"warning: no enrollment record for the {kind}; removing the default files")
            targets = default_files(layout, kind)
        for target in targets:
            if target not in (layout.pyz, service):
                inst.remove(target)
        if args.purge and (record or {}).get("user_created"):
            remove_user = record.get("user") or SERVICE_USER
        inst.remove(layout.record(kind))
    if args.purge:
        for kind in [args.kind] if args.kind else KINDS:
            recorded = [_as_target(layout, d) for d in purge_dirs.get(kind, [])]
            for folder in recorded or [layout.work_dir if kind == "worker" else layout.data_dir]:
                inst.remove_tree(folder)
    if not remaining:
        inst.remove(layout.pyz)
        if remove_user and layout.system == "linux":
            inst.run(["userdel", remove_user], ignore_failure=True)
    for folder in (layout.etc, layout.state, layout.base):
        inst.prune(folder)
    if layout.unit_dir is not None and inst.root is not None:
        inst.prune(layout.unit_dir)
    kept = "" if args.purge else "; data folders kept (add --purge to remove them)"
    out(("dry run: nothing was removed or run" if inst.dry_run else
         f"uninstalled {', '.join(kinds) or 'nothing; purged data folders'}") + kept)
    return 0


def _as_target(layout: Layout, raw: str) -> PurePath:
    return PureWindowsPath(raw) if layout.system == "windows" else PurePosixPath(raw)


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true",
                        help="print every file it would write and every command it would run; change nothing")
    common.add_argument("--root", metavar="DIR",
                        help="install into this staging folder (every path prefixed); system commands are printed, "
                             "not run")
    common.add_argument("--os", choices=("linux", "windows"), default=sys_platform(),
                        help="the target system's kind (default: this one's); another needs --root or --dry-run")
    common.add_argument("--user", help=f"service account (default {SERVICE_USER}; on Windows {WINDOWS_ACCOUNT})")
    common.add_argument("--program-data", help=argparse.SUPPRESS)
    install = argparse.ArgumentParser(add_help=False, parents=[common])
    install.add_argument("--no-start", action="store_true", help="install and enable the service, but do not start it")
    install.add_argument("--python", help=f"interpreter the service runs (default {LINUX_PYTHON}; on Windows this one)")
    install.add_argument("--pyz", metavar="FILE|URL",
                         help="install this zipapp instead of the running one; an https:// URL is downloaded "
                              "(needs --zipapp-sha256)")
    install.add_argument("--zipapp-sha256", metavar="HEX",
                         help="refuse to install a zipapp whose sha256 differs (the pin `jobs hosts add` prints)")

    p = argparse.ArgumentParser(prog="cis490fleet enroll",
                                description="Install this zipapp as a service on this host, or remove it.")
    sub = p.add_subparsers(dest="command", metavar="{worker,coordinator,uninstall}")
    w = sub.add_parser("worker", parents=[install], help="install the worker service (systemd / Scheduled Task)")
    w.add_argument("--receiver", action="append", metavar="URL", required=True,
                   help="coordinator URL; repeat for several peers")
    w.add_argument("--host-id", "--host", dest="host_id", help="this host's id (default: the short host name)")
    w.add_argument("--host-key-file", metavar="FILE|-",
                   help="this host's key from `jobs hosts add` (- reads it from standard input); installed "
                        "readable by the service account only, for `work --host-key-file`")
    w.add_argument("--insecure", action="store_true", help="allow an http:// --pyz download")
    w.add_argument("--ca", help="CA that signed the coordinator's certificate (copied next to the config)")
    w.add_argument("--cert", help="this host's client certificate (mutual TLS)")
    w.add_argument("--key", help="the client certificate's private key")
    w.add_argument("--slots", type=int, help="jobs at once (default: one per GPU, else 1)")
    w.add_argument("--grace-s", type=float, help=f"seconds a trainer gets after SIGTERM (default {DEFAULT_GRACE_S})")
    w.add_argument("--work-dir", help="where trainers run (default /var/lib/cis490fleet/work)")
    w.add_argument("--skip-coordinator-check", action="store_true",
                   help="do not ask the coordinator (no health check, no registration)")
    c = sub.add_parser("coordinator", parents=[install], help="install the coordinator service (systemd)")
    c.add_argument("--bind", default=DEFAULT_BIND, metavar="HOST:PORT", help=f"listen address (default {DEFAULT_BIND})")
    c.add_argument("--manifest", help="training manifest, copied to /etc/cis490fleet/training_manifest.toml")
    c.add_argument("--cert", help="server certificate (PEM)")
    c.add_argument("--key", help="server private key (PEM)")
    c.add_argument("--client-ca", help="CA of the workers' client certificates (mutual TLS)")
    c.add_argument("--operator-token-file", help="operator token to install (default: a new random one)")
    c.add_argument("--cluster-key-file", metavar="FILE|-",
                   help="the key the peers share, from the first peer's `serve --cluster-key-file` (- reads it "
                        "from standard input); installed readable by the service account only, and given to serve")
    c.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --bind without TLS, and an http:// --pyz download")
    c.add_argument("--data", help="data folder (default /var/lib/cis490fleet/data)")
    u = sub.add_parser("uninstall", parents=[common], help="stop and remove what enroll installed")
    u.add_argument("kind", nargs="?", choices=KINDS, help="only this service (default: every one enrolled)")
    u.add_argument("--purge", action="store_true", help="also remove the data folders and the service account")
    args = p.parse_args(argv)
    if not args.command:
        p.error("say what to enroll: worker, coordinator or uninstall")
    return args


def main(argv: list[str] | None = None) -> int:
    check_python()
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as stop:
        return int(stop.code or 0)
    if args.os != sys_platform() and not (args.root or args.dry_run):
        raise errors.ConfigError(f"--os {args.os} differs from this host; stage it with --root DIR or --dry-run")
    root = None
    if args.root:
        root = Path(args.root).expanduser().resolve()
        if root == Path(root.anchor):
            raise errors.ConfigError("--root / is the live system; leave --root out to install for real")
    if root is None and not args.dry_run and args.os == "linux" and hasattr(os, "geteuid") and os.geteuid() != 0:
        raise errors.ConfigError("enroll installs a system service: run it as root (sudo), "
                                 "or preview with --dry-run, or stage with --root DIR")
    inst = Installer(layout=layout_for(args.os, args.program_data), root=root, dry_run=args.dry_run,
                     out=lambda line: print(line, flush=True))
    if args.dry_run:
        inst.out("dry run: printing what would change")
    if args.command == "uninstall":
        return uninstall(args, inst)
    inst.out(f"python: {sys.version.split()[0]} ok")
    if args.command == "worker":
        return install_worker(args, inst)
    return install_coordinator(args, inst)
