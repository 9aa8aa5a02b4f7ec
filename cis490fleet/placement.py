"""Faster hosts for longer jobs: how long a job should take on each host, and which job a free host takes
so that the queue ends sooner.

Pure core: functions of their arguments and ``now``; never reads a clock or the queue. The queue (jobstore)
gathers finished attempts per host and model, the hosts' declared speeds and what each live host holds;
bench/placement.py runs the same functions over a simulated lab.

Speeds are relative. A host's declared ``speed`` ([[hosts]]) is its speed for every model, 1.0 when not
declared; once a model has finished attempts, its *work* is the mean of (seconds x declared speed) over
them, and a host that finished the model itself gets its measured speed for that model (work / its mean
seconds). A job's expected seconds on a host are its ``expected_minutes`` (at speed 1.0), else its model's
work, divided by that speed; unknown when neither exists.

A free host asks for a job: ``plan`` walks the claimable jobs, higher priority first and within a priority
the longest first, and gives each to the eligible host expected to finish it first (a host's slots are
free now or when their jobs are expected to end), as list scheduling does; the asking host takes the
first job given to it. Every job it passes over is expected to finish on a faster host sooner than it
would here, starting now. The plan is made again at every claim, so the wait is checked again each time a
host asks: a faster host that stays busy longer than expected (past twice its job's expected time it
counts as busy for good) or goes away stops holding jobs back. A job of unknown length goes to the first
eligible host that asks, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

NEVER = float("inf")


@dataclass(frozen=True)
class Runs:
    """Finished attempts of one model on one host: how many and their seconds in all."""

    host: str
    model: str
    count: int
    seconds: float


class Speeds:
    """Expected durations from the declared speeds and the finished attempts."""

    def __init__(self, declared: dict[str, float], runs: list[Runs]):
        self.declared = declared
        self._mean: dict[tuple[str, str], float] = {}
        work: dict[str, list[float]] = {}
        for r in runs:
            if r.count > 0 and r.seconds > 0:
                self._mean[(r.host, r.model)] = r.seconds / r.count
                w = work.setdefault(r.model, [0.0, 0])
                w[0] += r.seconds * self.base(r.host)
                w[1] += r.count
        self.work = {model: total / n for model, (total, n) in work.items()}

    def known(self) -> bool:
        """Whether any model has finished attempts (else only expected_minutes tell durations)."""
        return bool(self.work)

    def matter(self, tolerance: float = 1.25, floor_s: float = 60.0) -> bool:
        """Whether finished attempts make a plan worth its cost: speeds are declared, or hosts that ran a
        model of at least ``floor_s`` seconds took more than ``tolerance`` times as long as others. Else
        claims may go by queue order: a plan would change little and cost a claim several times its time."""
        if self.declared:
            return True
        means: dict[str, list[float]] = {}
        for (_, model), mean in self._mean.items():
            if self.work.get(model, 0.0) >= floor_s:
                means.setdefault(model, []).append(mean)
        return any(max(m) > tolerance * min(m) for m in means.values())

    def base(self, host: str) -> float:
        return self.declared.get(host) or 1.0

    def speed(self, host: str, model: str) -> float:
        """The host's speed for the model: measured when it finished the model before, else declared."""
        mean = self._mean.get((host, model))
        if mean is not None and model in self.work:
            return self.work[model] / mean
        return self.base(host)

    def job_work(self, model: str, expected_minutes: float | None) -> float | None:
        """A job's seconds at speed 1.0: its expected_minutes, else its model's work; None when unknown."""
        return expected_minutes * 60.0 if expected_minutes else self.work.get(model)

    def expected_seconds(self, host: str, model: str, expected_minutes: float | None) -> float | None:
        work = self.job_work(model, expected_minutes)
        return None if work is None else work / self.speed(host, model)


def slot_times(now: float, slots: int, held: list[tuple[float, float | None]]) -> list[float]:
    """When each slot of a host is expected to be free: now for a free slot; a held job's expected end
    (start + expected seconds, now when unknown or overdue), or never once it ran past twice that."""
    times = []
    for started, seconds in held[:slots]:
        if seconds is None:
            times.append(now)
        elif now - started > 2 * seconds:
            times.append(NEVER)
        else:
            times.append(max(now, started + seconds))
    return sorted(times + [now] * max(0, slots - len(held)))


@dataclass(frozen=True)
class QueuedJob:
    """A claimable job as the plan sees it: its key, model, expected_minutes, the hosts eligible for it and
    its priority."""

    key: str
    model: str
    expected_minutes: float | None
    hosts: frozenset[str]
    priority: int = 0


@dataclass(frozen=True)
class Planned:
    """Where the plan puts a job: on ``host``, starting at ``start``, ending at ``end`` (seconds since the
    epoch); ``alternative`` is the asking host's expected end, had it taken the job now."""

    key: str
    host: str
    start: float
    end: float
    alternative: float | None


def plan(host: str, now: float, queue: list[QueuedJob], slots: dict[str, list[float]], speeds: Speeds
         ) -> tuple[str | None, list[Planned]]:
    """(the key of the job ``host`` takes now, or None; the jobs before it, each planned on a faster host).

    ``slots`` maps each live host to its slots' expected free times (``slot_times``); ``host`` is in it
    with a free slot. Jobs ``host`` is not eligible for are planned too: they hold the other hosts' time.
    """
    ready = {h: sorted(times) for h, times in slots.items()}
    passed: list[Planned] = []
    for job in longest_first(queue, speeds):
        best = None
        for h in sorted(job.hosts & ready.keys()):
            seconds = speeds.expected_seconds(h, job.model, job.expected_minutes)
            if seconds is None:
                if h == host:
                    return job.key, passed
                continue
            start = ready[h][0]
            if start == NEVER:
                continue
            end = start + seconds
            if best is None or end < best[2] or (end == best[2] and h == host):
                best = (h, start, end)
        if best is None:
            continue
        if best[0] == host:
            return job.key, passed
        if host in job.hosts:
            mine = speeds.expected_seconds(host, job.model, job.expected_minutes)
            passed.append(Planned(job.key, best[0], best[1], best[2], None if mine is None else now + mine))
        ready[best[0]] = sorted(ready[best[0]][1:] + [best[2]])
    return None, passed


def longest_first(queue: list[QueuedJob], speeds: Speeds) -> list[QueuedJob]:
    """Higher priority first, as always; within a priority, jobs of unknown length keep their queue order
    ahead of the others, then the longest first: a long job started last would end the sweep late."""
    def key(job: QueuedJob) -> tuple[int, float]:
        work = speeds.job_work(job.model, job.expected_minutes)
        return -job.priority, -(NEVER if work is None else work)
    return sorted(queue, key=key)


def explain(p: Planned, asking: str, now: float) -> str:
    """Why ``asking`` passed over a job: the sentence `jobs show` prints."""
    here = "" if p.alternative is None else f" (here: {duration(p.alternative - now)})"
    return (f"waits for a faster host: {p.host} is expected to start it in {duration(p.start - now)} and finish "
            f"it in {duration(p.end - now)}, sooner than {asking} would{here}")


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
