"""Eligibility: which host may take which job, every refusal as a sentence an operator can act on.

Pure core: functions of their arguments only. An empty list of refusals means
eligible. The queue (jobstore) gathers the inputs — the worker's effective
capability, its held slots, whether a live CUDA host could take the job, the
status of each dependency — and shows the refusals to operators ("why is this
job still pending?").
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from cis490fleet.model import CANCELLED, CLAIMED, COMPLETED, FAILED, PENDING, RUNNING, HostSpec, JobSpec
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
