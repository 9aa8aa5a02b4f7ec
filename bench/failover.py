#!/usr/bin/env python3
"""Benchmarks of a replicated coordinator group: failover time, replicated claim throughput, follower catch-up.

    python3 bench/failover.py [--quick] [--only failover|replicated_claim|catchup]...

- failover: kill -9 of the leader to the first acknowledged claim answered by a
  surviving peer, over 20 rounds (quick: 5); p50 goal <= 2.5 s, p99 goal <= 4 s.
  The killed peer is restarted and caught up before the next round.
- replicated_claim: claims/s of a 3-peer group (load on the leader) as a ratio to a
  single peer on the same machine and queue, rounds interleaved; goal >= 0.5. Every
  claim is applied on all three peers, so where three peers and the load share two or
  three cores the ratio measures CPU sharing more than replication (``cpus`` is recorded).
- catchup: a follower is killed, the group hands out 100,000 claims (quick: 10,000)
  without it, then it is restarted: seconds until it has applied everything; goal <= 10 s.

Every peer starts from the same queue file (same state at log index 0), so building a
large queue costs nothing in the log. Lines read ``name: value unit (ratio R vs BASELINE)``
as in bench/run.py, which calls ``run_all(bench)`` for ``--only failover``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import loadgen  # noqa: E402
from peer_harness import PeerGroup, http_json  # noqa: E402

NAMES = ("failover", "replicated_claim", "catchup")
GROUP_ENV = {"CIS490_LOG_LEVEL": "WARNING"}


def _run_module():
    import run

    return run


def seeded_group(work: Path, template: Path, **kw) -> PeerGroup:
    """Three direct (unproxied) peers, each on its own copy of ``template``."""
    # The load sends unsigned x-lab-host requests, as bench/run.py's unsigned claims: the legacy mode.
    group = PeerGroup(work, n=3, proxies=False, env=GROUP_ENV,
                      extra_args=("--synchronous", "FULL", "--trust-host-header"), **kw)
    for peer in group.peers.values():
        peer.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, peer.data_dir / "queue.sqlite3")
    return group


def claim_once(url: str, host: str, timeout: float) -> bool:
    """One claim: True when it was acknowledged with a job."""
    try:
        status, body = http_json(url, "POST", "/v1/job/claim", {"capability": dict(loadgen.CPU, slots=10**6)},
                                 {"x-lab-host": host}, timeout=timeout)
    except OSError:
        return False
    return status == 200 and isinstance(body, dict) and bool(body.get("job_id"))


def wait_caught_up(group: PeerGroup, timeout: float = 120) -> None:
    """Until every peer answers and all report the same applied index."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hs = group.healths()
        applied = {(h or {}).get("applied") for h in hs.values()}
        if None not in applied and len(applied) == 1:
            return
        time.sleep(0.05)
    raise TimeoutError(f"peers did not catch up within {timeout} s: {group.healths()}")


def failover(bench) -> None:
    run = _run_module()
    rounds = 5 if bench.quick else 20
    template = run.build_queue(bench.work / "templates" / "failover.sqlite3", run.jobs_json(5_000))
    times: list[float] = []
    with seeded_group(bench.dir("failover"), template) as group:
        group.wait_up()
        for r in range(rounds):
            leader = group.wait_leader(60)
            wait_caught_up(group)
            if not claim_once(group.peers[leader].url, "probe", 10):
                raise RuntimeError(f"round {r}: leader {leader} did not answer a claim before the kill")
            others = [group.peers[n].url for n in group.node_ids if n != leader]
            group.kill9(leader)
            t0 = time.monotonic()
            i = 0
            while not claim_once(others[i % len(others)], f"r{r}", 0.5):
                i += 1
                if time.monotonic() - t0 > 60:
                    raise RuntimeError(f"round {r}: no claim acknowledged within 60 s of killing {leader}")
            times.append(time.monotonic() - t0)
            group.start(leader)
            group.wait_up(leader)
    p50, p99 = statistics.median(times), run.percentile(times, 0.99)
    bench.report("failover p50", p50, "s", p50 / 2.5, "the goal of 2.5 s", "<= 2.5 s", p50 <= 2.5, samples=times)
    bench.report("failover p99", p99, "s", p99 / 4.0, "the goal of 4 s", "<= 4 s", p99 <= 4.0, samples=times)


def replicated_claim(bench) -> None:
    run = _run_module()
    duration, rounds = (3.0, 1) if bench.quick else (8.0, 3)
    template = bench.claim_template()
    rates: dict[str, list[float]] = {"group": [], "single": []}
    for r in range(rounds):
        for name in (("group", "single") if r % 2 == 0 else ("single", "group")):
            work = bench.dir(f"replicated-{name}")
            if name == "single":
                with run.serve(run.fresh_data(work, template)) as server:
                    res = loadgen.run(server.port, "claim", connections=16, processes=2, duration=duration,
                                      warmup=1.0)
            else:
                with seeded_group(work, template) as group:
                    group.wait_up()
                    leader = group.wait_leader(60)
                    res = loadgen.run(group.peers[leader].port, "claim", connections=16, processes=2,
                                      duration=duration, warmup=1.0)
            rates[name].append(res["rate"])
    ratio = statistics.median(g / s for g, s in zip(rates["group"], rates["single"]))
    value = statistics.median(rates["group"])
    bench.report("replicated_claim", value, "claims/s", ratio,
                 f"a single peer on the same queue ({run.fmt(statistics.median(rates['single']))} claims/s)",
                 "ratio >= 0.5", ratio >= 0.5, samples=rates, cpus=os.cpu_count())


def catchup(bench, behind: int | None = None) -> None:
    run = _run_module()
    behind = behind or (10_000 if bench.quick else 100_000)
    template = run.build_queue(bench.work / "templates" / f"catchup-{behind}.sqlite3",
                               run.jobs_json(behind + behind // 2))
    with seeded_group(bench.dir("catchup"), template) as group:
        group.wait_up()
        leader = group.wait_leader(60)
        follower = next(n for n in group.node_ids if n != leader)
        group.kill9(follower)
        connections = 16
        res = loadgen.run(group.peers[leader].port, "claim", connections=connections, processes=2,
                          duration=600, warmup=0, max_ops=-(-behind // connections))
        target = group.health(leader, timeout=10)["commit"]
        t0 = time.monotonic()
        group.start(follower)
        while True:
            h = group.health(follower)
            if h is not None and (h.get("applied") or 0) >= target:
                break
            peer = group.peers[follower]
            if not peer.alive or time.monotonic() - t0 > 300:
                state = "exited" if not peer.alive else f"did not reach index {target} within 300 s"
                raise RuntimeError(f"follower {follower} {state} (health {h}):\n{peer.log_text(2000)}")
            time.sleep(0.02)
        seconds = time.monotonic() - t0
    bench.report("catchup", seconds, "s", seconds / 10, f"the goal of 10 s (behind by {res['ops']} claims, "
                 f"{target} log entries)", "<= 10 s", seconds <= 10, behind=res["ops"], index=target)


def run_all(bench, names=NAMES) -> list[str]:
    """Run the chosen figures on ``bench`` (bench/run.py's Bench); the names that failed."""
    failed = []
    for name in names:
        try:
            globals()[name](bench)
        except Exception as err:  # one broken figure must not hide the others
            failed.append(name)
            print(f"{name}: FAILED ({type(err).__name__}: {err})", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 failover rounds, one throughput round, 10,000 behind")
    p.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                   help=f"run only this figure (repeatable): {', '.join(NAMES)}")
    args = p.parse_args(argv)
    run = _run_module()
    with tempfile.TemporaryDirectory(prefix="cis490-failover-") as tmp:
        bench = run.Bench(args.quick, Path(tmp))
        failed = run_all(bench, [n for n in NAMES if not args.only or n in args.only])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
