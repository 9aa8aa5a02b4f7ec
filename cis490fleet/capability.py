"""Detect this host's capability: cores, memory, GPUs, torch, trainer commit, free disk.

Every probe is bounded by a timeout and fails soft (a warning and an empty
value), so a broken driver or a hung ``nvidia-smi`` never stops a worker from
starting. torch is never imported here: its version comes from package
metadata and its GPU list from a short-lived child process.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys

from cis490fleet import model

log = logging.getLogger(__name__)

GIB = 2**30

_TORCH_PROBE = (
    "import json, torch\n"
    "gpus = []\n"
    "if torch.cuda.is_available():\n"
    "    for i in range(torch.cuda.device_count()):\n"
    "        p = torch.cuda.get_device_properties(i)\n"
    "        gpus.append({'index': i, 'name': p.name, 'vram_gib': round(p.total_memory / 2**30, 2)})\n"
    "print(json.dumps(gpus))\n"
)


def _run(argv: list[str], timeout: float) -> str | None:
    """stdout of ``argv``, or None when it is missing, fails or outlives ``timeout`` (it is then killed)."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=os.name != "nt")
    except OSError as err:
        log.warning("capability probe %s could not start: %s", argv[0], err)
        return None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        log.warning("capability probe %s did not answer within %.1f s; ignoring it", " ".join(argv[:2]), timeout)
        return None
    if proc.returncode != 0:
        log.warning("capability probe %s exited with %s: %s", " ".join(argv[:2]), proc.returncode,
                    err.decode(errors="replace").strip()[-300:])
        return None
    return out.decode(errors="replace")


def _kill(proc: subprocess.Popen) -> None:
    """Kill the probe and whatever it started (its session), then reap it."""
    try:
        if os.name != "nt":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()
    proc.wait()


def _ram_gib(timeout: float) -> float:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        return round(int(line.split()[1]) * 1024 / GIB, 2)
        except (OSError, ValueError, IndexError) as err:
            log.warning("could not read /proc/meminfo: %s", err)
    if os.name == "nt":
        return _ram_gib_windows()
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "hw.memsize"], timeout)
        if out and out.strip().isdigit():
            return round(int(out.strip()) / GIB, 2)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 2)
    except (ValueError, OSError, AttributeError) as err:
        log.warning("could not read the memory size: %s", err)
        return 0.0


def _ram_gib_windows() -> float:
    class MEMORYSTATUSEX(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MEMORYSTATUSEX()
    status.dwLength = ctypes.sizeof(MEMORYSTATUSEX)
    try:
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return round(status.ullTotalPhys / GIB, 2)
    except (AttributeError, OSError) as err:
        log.warning("GlobalMemoryStatusEx failed: %s", err)
    return 0.0


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        try:
            return len(os.sched_getaffinity(0))
        except OSError:
            pass
    return os.cpu_count() or 1


def parse_nvidia_smi(text: str) -> list[dict]:
    """Rows of ``index, name, memory.total`` (MiB) -> [{"index", "name", "vram_gib"}]; bad rows skipped."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            index, mib = int(parts[0]), float(parts[-1])
        except ValueError:
            log.warning("nvidia-smi printed a row that is not 'index, name, MiB': %r", line)
            continue
        gpus.append({"index": index, "name": ",".join(parts[1:-1]), "vram_gib": round(mib / 1024, 2)})
    return gpus


def _gpus(timeout: float) -> list[dict] | None:
    smi = shutil.which("nvidia-smi")
    if smi:
        out = _run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"], timeout)
        return None if out is None else parse_nvidia_smi(out)
    if importlib.util.find_spec("torch") is None:
        return []
    out = _run([sys.executable, "-c", _TORCH_PROBE], timeout)
    if out is None:
        return None
    try:
        gpus = json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        log.warning("the torch GPU probe printed something unexpected: %r", out[-300:])
        return None
    return [g for g in gpus if isinstance(g, dict)]


def free_vram(timeout: float = 2.0) -> dict[int, float]:
    """GPU index -> free VRAM in GiB now, as ``nvidia-smi`` reports it; empty without it or when it fails."""
    smi = shutil.which("nvidia-smi")
    out = _run([smi, "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"], timeout) if smi else None
    free = {}
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            free[int(parts[0])] = round(float(parts[-1]) / 1024, 2)
        except (ValueError, IndexError):
            continue
    return free


def _torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit(trainer_dir: str | None, timeout: float) -> str | None:
    if not trainer_dir:
        return None
    git = shutil.which("git")
    if not git:
        log.warning("git is not installed; the trainer's commit stays unknown")
        return None
    out = _run([git, "-C", str(trainer_dir), "rev-parse", "HEAD"], timeout)
    commit = (out or "").strip()
    return commit or None


def _disk_free_gib(path: str) -> float:
    try:
        return round(shutil.disk_usage(path).free / GIB, 2)
    except OSError as err:
        log.warning("could not measure free disk space of %s: %s", path, err)
        return 0.0


def detect(overrides: dict | None = None, *, trainer_dir: str | None = None, work_dir: str | None = None,
           timeout: float = 5.0) -> dict:
    """This host's capability (``model.normalize_capability`` shape); ``overrides`` win over probes."""
    gpus = _gpus(timeout)
    raw = {
        "host": platform.node() or None,
        "os": platform.system().lower() or None,
        "python": platform.python_version(),
        "cores": _cores(),
        "ram_gib": _ram_gib(timeout),
        "cuda": bool(gpus),
        "gpus": gpus or [],
        "torch": _torch_version(),
        "git_commit": _git_commit(trainer_dir, timeout),
        "disk_free_gib": _disk_free_gib(work_dir or os.getcwd()),
    }
    raw.update(overrides or {})
    return model.normalize_capability(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cis490fleet capability",
                                     description="Print this host's detected capability as JSON.")
    parser.add_argument("--work-dir", help="folder whose free disk space is reported (default: the current one)")
    parser.add_argument("--trainer-dir", help="git checkout of the trainer, whose commit is reported")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds each probe may take (default 5)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    cap = detect(trainer_dir=args.trainer_dir, work_dir=args.work_dir, timeout=args.timeout)
    print(json.dumps(cap, indent=2, sort_keys=True))
    return 0
