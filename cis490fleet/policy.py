"""Eligibility: which host may take which job, every refusal as a sentence an operator can act on.

Pure core: functions of their arguments only. An empty list of refusals means
eligible. The queue (jobstore) gathers the inputs — the worker's effective
capability, its held slots, whether a live CUDA host could take the job, the
status of each dependency — and shows the refusals to operators ("why is this
job still pending?").
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from cis490fleet.model import CANCELLED, CLAIMED, COMPLETED, FAILED, PENDING, RUNNING, STOPPED, HostSpec, JobSpec
from cis490fleet.model import normalize_capability


def effective_capability(detected: dict, spec: HostSpec | None) -> dict:
    """The worker's detected capability with the manifest's ``[[hosts]]`` overrides applied.

    ``cuda = false`` as an override means "do not use this host's GPUs": unless
    the override also names them, gpus and vram_gib become empty.
    """
    cap = dict(detected or {})
    if spec is not None:
        overrides = dict(spec.capability)
        if overrides.get("cuda") is False:
            cap["gpus"] = []
            cap["vram_gib"] = 0.0
        if "gpus" in overrides and "vram_gib" not in overrides:
            cap.pop("vram_gib", None)
        cap.update(overrides)
        if spec.slots is not None:
            cap["slots"] = spec.slots
    return normalize_capability(cap)


def _gib(value: float) -> str:
    return f"{float(value):.1f}"


def _quoted(patterns) -> str:
    return ", ".join(repr(p) for p in patterns)


def static_refusals(job: JobSpec, host_id: str, cap: dict, spec: HostSpec | None) -> list[str]:
    """Refusals that hold as long as the manifest and the host's capability do not change."""
    out = []
    if job.allowed_hosts and host_id not in job.allowed_hosts:
        out.append(f"the job may run only on {', '.join(job.allowed_hosts)} (allowed_hosts); "
                   f"host {host_id} is not one of them")
    if spec is not None:
        denied = [p for p in spec.deny_jobs if fnmatchcase(job.model, p)]
        if denied:
            out.append(f"host {host_id} denies model {job.model!r} (deny_jobs {_quoted(denied)} in its [[hosts]] entry)")
        elif not any(fnmatchcase(job.model, p) for p in spec.allow_jobs):
            allowed = _quoted(spec.allow_jobs) if spec.allow_jobs else "nothing"
            out.append(f"host {host_id} allows only {allowed} (allow_jobs in its [[hosts]] entry); "
                       f"the job is model {job.model!r}")
    if job.require_cuda and not cap.get("cuda"):
        out.append(f"host {host_id} has no CUDA; the job requires it")
    if job.gpus and len(host_gpus(cap)) < job.gpus:
        out.append(f"host {host_id} has {len(host_gpus(cap))} GPU(s); the job needs {job.gpus} (gpus)")
    vram = float(cap.get("vram_gib") or 0.0)
    if job.min_vram_gib > 0 and vram < job.min_vram_gib:
        out.append(f"host {host_id} has {_gib(vram)} GiB VRAM; the job needs {_gib(job.min_vram_gib)}")
    ram = float(cap.get("ram_gib") or 0.0)
    if job.min_ram_gib > 0 and ram < job.min_ram_gib:
        out.append(f"host {host_id} has {_gib(ram)} GiB RAM; the job needs {_gib(job.min_ram_gib)}")
    return out


def prefer_cuda_refusal(job: JobSpec, host_id: str, cap: dict, cuda_host_available: bool) -> str | None:
    """A host without CUDA takes a prefer_cuda job only when no live CUDA host is eligible for it."""
    if job.prefer_cuda and not cap.get("cuda") and cuda_host_available:
        return (f"the job prefers CUDA and a live CUDA host is eligible for it; host {host_id} has no CUDA "
                "and takes it only when no such host is")
    return None


def slot_refusal(host_id: str, held: int, slots: int) -> str | None:
    if held >= slots:
        return (f"host {host_id} already runs {held} job{'s' if held != 1 else ''} in its {slots} "
                f"slot{'s' if slots != 1 else ''}; it takes another when one finishes (or raise its slots)")
    return None


_WAITING = {
    PENDING: "which is pending",
    CLAIMED: "which a worker has just claimed",
    RUNNING: "which is running",
    FAILED: "which failed: requeue it",
    CANCELLED: "which was cancelled: requeue it",
    STOPPED: "which was stopped early: requeue it",
}


def dependency_refusals(job: JobSpec, dep_status: dict[str, str | None]) -> list[str]:
    """One refusal per dependency (``after``) that has not completed; name -> status, None if unknown."""
    out = []
    for name in job.after:
        status = dep_status.get(name)
        if status == COMPLETED:
            continue
        if status is None:
            out.append(f"waits for {name!r}, which is not in the queue: add it to the manifest and reload, "
                       "or remove it from 'after'")
        else:
            out.append(f"waits for {name!r}, {_WAITING.get(status, f'which is {status}')}")
    return out


def refusals(job: JobSpec, host_id: str, cap: dict, spec: HostSpec | None, *, held: int, slots: int,
             cuda_host_available: bool, dep_status: dict[str, str | None]) -> list[str]:
    """Every reason ``host_id`` may not take ``job`` now; empty means eligible."""
    out = static_refusals(job, host_id, cap, spec)
    prefer = prefer_cuda_refusal(job, host_id, cap, cuda_host_available)
    if prefer:
        out.append(prefer)
    slot = slot_refusal(host_id, held, slots)
    if slot:
        out.append(slot)
    out.extend(dependency_refusals(job, dep_status))
    return out


# -- GPUs: slots, VRAM accounting, multi-GPU jobs --


@dataclass(frozen=True)
class Placed:
    """The VRAM a held job was given on one GPU of its host (the store keeps it per attempt)."""

    gpu: int
    vram_gib: float
    share: bool  # the job allows sharing its GPU (its own gpu_share)


def host_gpus(cap: dict) -> list[dict]:
    """The host's GPUs ({"index", "name", "vram_gib"}); a CUDA host whose capability names only its
    ``vram_gib`` (a manifest override) has one GPU 0 of that size."""
    if not cap.get("cuda"):
        return []
    gpus = [g for g in cap.get("gpus") or [] if isinstance(g.get("index"), int)]
    if not gpus and float(cap.get("vram_gib") or 0.0) > 0:
        return [{"index": 0, "name": "", "vram_gib": float(cap["vram_gib"])}]
    return gpus


def plan_slots(cap: dict) -> list[dict]:
    """The host's slots as the coordinator sees them: ``cap["slots"]`` of them, slot i on GPU i (round robin
    when slots outnumber GPUs, so two slots of a one-GPU host both use it); no GPU on a CPU host."""
    indexes = [g["index"] for g in host_gpus(cap)]
    return [{"index": i, "gpus": [indexes[i % len(indexes)]] if indexes else []} for i in range(cap["slots"])]


def needs_gpu(job: JobSpec) -> bool:
    return job.require_cuda or job.gpus > 0 or job.min_vram_gib > 0


def vram_need(job: JobSpec, measured: float | None) -> float:
    """VRAM to account per GPU: the manifest's min_vram_gib, else the peak measured in earlier runs."""
    return job.min_vram_gib if job.min_vram_gib > 0 else float(measured or 0.0)


def place_gpus(job: JobSpec, host_id: str, need: float, slot: list[int], gpus: list[dict], placed: list[Placed], *,
               host_share: bool, free_reported: dict[int, float] | None = None) -> tuple[list[int] | None, str | None]:
    """The GPUs a claim from ``slot`` gives ``job`` on this host, or (None, the refusal).

    A GPU takes the job when nothing is placed on it, or when sharing is allowed (``gpu_share`` on the
    host, or on this job and every job already there) and ``need`` fits in what the placed jobs leave
    (and in the free VRAM the worker reported, when it did). The first GPU is the slot's; a job with
    ``gpus = N`` takes N - 1 more of the host's, of the same model unless ``mixed_gpus``. A job that does
    not need a GPU gets the slot's when it fits there, else none (it runs on the CPU).
    """
    by_index = {g["index"]: g for g in gpus}
    free_reported = free_reported or {}

    def check(index: int) -> str | None:
        gpu = by_index.get(index)
        if gpu is None:
            return f"host {host_id} has no GPU {index}"
        here = [p for p in placed if p.gpu == index]
        if here and not (host_share or (job.gpu_share and all(p.share for p in here))):
            return (f"GPU {index} of host {host_id} runs another job and is not shared "
                    "(set gpu_share = true on the host, or on every job that shares it)")
        free = float(gpu["vram_gib"]) - sum(p.vram_gib for p in here)
        if index in free_reported:
            free = min(free, free_reported[index])
        if free < need:
            return (f"GPU {index} of host {host_id} ({_gib(gpu['vram_gib'])} GiB) has {_gib(max(free, 0.0))} GiB "
                    f"free; the job needs {_gib(need)}")
        return None

    own = slot[0] if slot else None
    refused = check(own) if own is not None else f"this slot of host {host_id} has no GPU"
    if not needs_gpu(job):
        return ([] if refused else [own]), None
    if refused:
        return None, refused
    count = max(job.gpus, 1)
    name = by_index[own].get("name")
    others = [g["index"] for g in sorted(gpus, key=lambda g: g["index"])
              if g["index"] != own and (job.mixed_gpus or g.get("name") == name) and check(g["index"]) is None]
    if len(others) < count - 1:
        kind = "" if job.mixed_gpus else f" like GPU {own} ({name or 'unnamed'})"
        return None, (f"the job needs {count} GPUs of one host{kind}; host {host_id} has "
                      f"{len(others) + 1} free")
    return [own] + others[:count - 1], None
