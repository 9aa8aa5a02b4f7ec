#!/usr/bin/env python3
"""Placement by speed: a seeded simulation of a lab run through the real policy code, against first come.

    python3 bench/placement.py [--seed N] [--jobs 200] [--seeds]   (or: python3 bench/run.py --only placement)

The lab: a Raspberry Pi, two CPU boxes and two GPU workstations of different speed, one slot each.
Jobs: a sweep of mixed sizes over four models, some needing CUDA (and one of those more VRAM than the
smaller card has), queued in random order. Each job's true duration is its ``expected_minutes`` divided
by the host's speed, times a per-job noise the estimates never see (the coordinator learns from the
attempts that finish).

Both policies run the same event loop: whenever a host has a free slot it asks for a job, hosts that are
free at the same moment asking slowest first (a slow host idles most, so it asks first). Eligibility is
``policy.static_refusals``; "speed" is ``placement.plan`` with ``placement.Speeds`` learning from the
attempts finished so far; "first come" takes the first eligible job in queue order. Makespans are compared
with a lower bound: the largest of (a) the longest job on its fastest eligible host and (b) for all jobs,
the CUDA jobs and the jobs only the big card fits, their total work over the total speed of the hosts
that may run them.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cis490fleet import placement, policy  # noqa: E402
from cis490fleet.model import JobSpec, normalize_capability  # noqa: E402

MODELS = ("logreg", "mlp", "cnn", "gbt")


@dataclass(frozen=True)
class Host:
    id: str
    speed: float
    cap: dict


HOSTS = (
    Host("pi", 0.1, normalize_capability({"cores": 4, "ram_gib": 4})),
    Host("cpu-a", 0.4, normalize_capability({"cores": 16, "ram_gib": 64})),
    Host("cpu-b", 0.4, normalize_capability({"cores": 16, "ram_gib": 64})),
    Host("gpu-slow", 1.5, normalize_capability({"cores": 8, "ram_gib": 32, "cuda": True, "vram_gib": 8})),
    Host("gpu-fast", 4.0, normalize_capability({"cores": 16, "ram_gib": 64, "cuda": True, "vram_gib": 24})),
)


@dataclass(frozen=True)
class Job:
    spec: JobSpec
    minutes: float  # at speed 1.0, as the manifest says
    noise: float  # true duration / estimated


def make_jobs(seed: int, count: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        model = rng.choice(MODELS)
        minutes = round(math.exp(rng.uniform(math.log(1), math.log(120))), 1)
        kind = rng.random()
        cuda = model in ("mlp", "cnn") and kind < 0.3
        vram = 12.0 if cuda and kind < 0.08 else (4.0 if cuda else 0.0)
        spec = JobSpec(model=model, mode="train", seed=i, require_cuda=cuda, min_vram_gib=vram,
                       expected_minutes=minutes)
        jobs.append(Job(spec, minutes, math.exp(rng.gauss(0, 0.2))))
    return jobs


def true_seconds(job: Job, host: Host) -> float:
    return job.minutes * 60 * job.noise / host.speed


def eligible(job: Job) -> frozenset[str]:
    return frozenset(h.id for h in HOSTS if not policy.static_refusals(job.spec, h.id, h.cap, None))


def simulate(jobs: list[Job], how: str) -> float:
    """The makespan in seconds of the queue under ``how`` ("speed" or "first")."""
    hosts = {h.id: h for h in HOSTS}
    ask_order = sorted(hosts, key=lambda h: hosts[h].speed)
    ok = {j.spec.id: eligible(j) for j in jobs}
    pending = list(jobs)
    running: dict[str, tuple[Job, float, float]] = {}  # host -> (job, started, expected seconds)
    finished: dict[tuple[str, str], list[float]] = {}
    events: list[tuple[float, str]] = []
    declared = {h.id: h.speed for h in HOSTS}
    now = 0.0
    while pending or running:
        speeds = placement.Speeds(declared, [placement.Runs(h, m, len(s), sum(s)) for (h, m), s in finished.items()])
        for host in ask_order:
            if host in running or not pending:
                continue
            job = take(host, now, pending, running, speeds, ok, how)
            if job is None:
                continue
            pending.remove(job)
            expected = speeds.expected_seconds(host, job.spec.model, job.minutes)
            running[host] = (job, now, expected)
            heapq.heappush(events, (now + true_seconds(job, hosts[host]), host))
        if not events:
            raise RuntimeError(f"{len(pending)} jobs left that no host takes")
        now, host = heapq.heappop(events)
        job, started, _ = running.pop(host)
        finished.setdefault((host, job.spec.model), []).append(now - started)
    return now


def take(host: str, now: float, pending: list[Job], running: dict, speeds: placement.Speeds, ok: dict,
         how: str) -> Job | None:
    if how == "first":
        return next((j for j in pending if host in ok[j.spec.id]), None)
    slots = {h.id: placement.slot_times(now, 1, [running[h.id][1:]] if h.id in running else []) for h in HOSTS}
    queue = [placement.QueuedJob(j.spec.id, j.spec.model, j.minutes, ok[j.spec.id]) for j in pending]
    key, _ = placement.plan(host, now, queue, slots, speeds)
    return next((j for j in pending if j.spec.id == key), None)


def lower_bound(jobs: list[Job]) -> float:
    hosts = {h.id: h for h in HOSTS}
    bounds = [max(min(true_seconds(j, hosts[h]) for h in eligible(j)) for j in jobs)]
    for group in (jobs, [j for j in jobs if j.spec.require_cuda], [j for j in jobs if j.spec.min_vram_gib > 8]):
        if group:
            may = set().union(*(eligible(j) for j in group))
            bounds.append(sum(j.minutes * 60 * j.noise for j in group) / sum(hosts[h].speed for h in may))
    return max(bounds)


def run(seed: int = 490, count: int = 200) -> dict:
    jobs = make_jobs(seed, count)
    random.Random(seed + 1).shuffle(jobs)
    bound = lower_bound(jobs)
    speed = simulate(jobs, "speed")
    first = simulate(jobs, "first")
    return {"seed": seed, "jobs": count, "bound_s": bound, "speed_s": speed, "first_s": first,
            "speed_vs_bound": speed / bound, "speed_vs_first": speed / first, "first_vs_bound": first / bound}


def across(seeds: range, count: int = 200) -> dict:
    """The ratios over several seeds: median and worst, and how many seeds meet each goal."""
    runs = [run(seed, count) for seed in seeds]
    out = {"seeds": f"{seeds.start}..{seeds.stop - 1}"}
    for key, goal in (("speed_vs_bound", 1.15), ("speed_vs_first", 0.8), ("first_vs_bound", None)):
        values = sorted(r[key] for r in runs)
        out[key] = {"median": statistics.median(values), "worst": values[-1], "best": values[0]}
        if goal is not None:
            out[key]["met"] = sum(v <= goal for v in values)
    return out


def report(bench) -> None:
    """bench/run.py's figures: placement by speed against the bound and against first come."""
    r = run()
    many = across(range(1, 21))
    bench.report("placement_vs_bound", r["speed_vs_bound"], f"x the lower bound ({r['jobs']} jobs, seed {r['seed']})",
                 r["speed_vs_bound"], "the lower bound", "<= 1.15x", r["speed_vs_bound"] <= 1.15, seeds=many, **r)
    bench.report("placement_vs_first_come", r["speed_vs_first"], "x first-come's makespan", r["speed_vs_first"],
                 "first come", "<= 0.8x", r["speed_vs_first"] <= 0.8, seeds=many, **r)
    print(summary(many), flush=True)


def summary(many: dict) -> str:
    b, f, fb = many["speed_vs_bound"], many["speed_vs_first"], many["first_vs_bound"]
    return (f"  seeds {many['seeds']}: by speed {b['median']:.3f}x the bound (worst {b['worst']:.3f}x, "
            f"{b['met']}/20 <= 1.15x); {f['median']:.3f}x first come (worst {f['worst']:.3f}x, {f['met']}/20 <= 0.8x); "
            f"first come itself {fb['median']:.3f}x the bound (best {fb['best']:.3f}x)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=490)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--seeds", action="store_true", help="also the median and worst over seeds 1..20")
    args = p.parse_args(argv)
    r = run(args.seed, args.jobs)
    h = 3600.0
    print(f"{r['jobs']} jobs, seed {r['seed']}: lower bound {r['bound_s'] / h:.2f} h")
    print(f"  by speed:   {r['speed_s'] / h:6.2f} h  {r['speed_vs_bound']:.3f}x the bound  "
          f"{r['speed_vs_first']:.3f}x first come   [goals <= 1.15x, <= 0.8x]")
    print(f"  first come: {r['first_s'] / h:6.2f} h  {r['first_vs_bound']:.3f}x the bound")
    if args.seeds:
        print(summary(across(range(1, 21), args.jobs)))
    return 0 if r["speed_vs_bound"] <= 1.15 and r["speed_vs_first"] <= 0.8 else 1


if __name__ == "__main__":
    raise SystemExit(main())
