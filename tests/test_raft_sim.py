"""The Raft core under deterministic simulation: many seeds of crashes, drops, delays and partitions.

Each seed checks, after every step, election safety (§5.2), log matching (§5.3),
leader completeness (§5.4), state machine safety (§5.4.3), durable commits and
linearizable ReadIndex reads (§8), then liveness once the network heals
(see tests/raft_sim.py). Besides crashes, drops, delays and partitions, seeds
change the membership (thesis §4: learners, promotions, removals, replacements),
lose a member's storage (also right after it granted a vote) and apply commands
that fail. A failure prints ``seed=N`` and the command that replays it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cis490fleet import raft
from cis490fleet.raft import RaftNode
from raft_sim import InvariantViolation, Sim, SimConfig, run_seed

SEEDS_3 = range(0, 400)
SEEDS_5 = range(10_000, 10_200)


@pytest.mark.parametrize("seed", SEEDS_3)
def test_three_nodes(seed):
    run_seed(seed, nodes=3)


@pytest.mark.parametrize("seed", SEEDS_5)
def test_five_nodes(seed):
    run_seed(seed, nodes=5)


def test_a_seed_replays_exactly():
    def fingerprint(seed):
        sim = run_seed(seed, nodes=3)
        states = {i: (m.node.status(), m.app_digest) for i, m in sim.members.items()}
        return list(sim.trace), dict(sim.stats), states

    assert fingerprint(42) == fingerprint(42)
    assert fingerprint(42) != fingerprint(43)


def test_a_seed_replays_exactly_in_another_process():
    """The replay command printed on failure must reproduce the run, whatever the hash seed."""
    script = Path(__file__).with_name("raft_sim.py")
    runs = [subprocess.run([sys.executable, str(script), "--seed", "42", "--nodes", "5", "--trace"],
                           capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": hs, "PYTHONPATH": str(script.parent.parent)})
            for hs in ("1", "2")]
    assert runs[0].stdout == runs[1].stdout
    assert "leader n" in runs[0].stdout
    assert runs[0].stdout.splitlines()[-1].startswith("1 seeds ok: ")


def test_the_simulation_does_things():
    """Guards against a simulator that passes because nothing happens."""
    totals = {}
    for seed in range(40):
        for key, value in run_seed(seed, nodes=3).stats.items():
            totals[key] = totals.get(key, 0) + value
    for what in ("elections", "applied", "crash", "partitions", "compactions", "snapshots_installed", "reads",
                 "membership_changes", "storage_lost", "apply_errors"):
        assert totals.get(what, 0) > 0, f"no {what} in 40 seeds: {totals}"


def test_the_checks_fire():
    sim = Sim(7, SimConfig(nodes=3, steps=0))
    for name in ("n1", "n2"):  # corrupt two nodes so that election safety must fail
        sim.members[name].node.term = 5
        sim.members[name].node.role = "leader"
    sim.check_leader(sim.members["n1"])
    with pytest.raises(InvariantViolation, match="election safety: n1 and n2 both leaders in term 5"):
        sim.check_leader(sim.members["n2"])


def _vote_for_anyone(self, last_index, last_term):
    return True


def _vote_twice(self, msg, _original=RaftNode._on_vote_request):
    self.vote = self.leader = None
    _original(self, msg)


def _heartbeat_full_commit(self, ctx):
    for peer in self._progress:
        self._send({"type": "Heartbeat", "to": peer, "commit": self.commit, "ctx": ctx})


def _read_at_once(self, ctx, requester):
    self._reads.append(raft._Read(ctx, self.commit, requester, {self.id}))
    self._release_reads(self._reads[-1])


def _change_at_any_time(self):
    return None


KNOWN_BUGS = {
    "two membership changes in flight at once (thesis §4.1)": ("_change_pending", _change_at_any_time),
    "a vote for a stale log (§5.4.1)": ("_up_to_date", _vote_for_anyone),
    "two votes in one term (§5.2)": ("_on_vote_request", _vote_twice),
    "a heartbeat commit beyond what the follower matches": ("_broadcast_heartbeat", _heartbeat_full_commit),
    "a read without a heartbeat quorum (thesis §6.4)": ("_leader_read", _read_at_once),
}


def _first_failure() -> tuple[int, str] | None:
    for seed in range(400):
        try:
            run_seed(seed, nodes=5 if seed % 2 else 3)
        except InvariantViolation as exc:
            return seed, str(exc)
    return None


@pytest.mark.parametrize("bug", KNOWN_BUGS)
def test_the_simulation_catches_known_bugs(monkeypatch, bug):
    monkeypatch.setattr(RaftNode, *KNOWN_BUGS[bug])
    found = _first_failure()
    assert found is not None, f"400 seeds did not notice {bug}"
    seed, report = found
    assert report.startswith(f"seed={seed} ")
    assert f"replay: python tests/raft_sim.py --seed {seed} " in report
    assert _first_failure() == found, "the failing seed did not replay exactly"


def test_the_simulation_catches_a_wiped_member_that_seeds_again(monkeypatch):
    """Restarted empty under its old id as if it started a new group (what the old advice to move the raft
    store away amounted to), a member forgets its vote and its acknowledged entries: safety breaks."""
    original = Sim.start

    def start_as_seed(self, m):
        m.wiped, wiped = False, m.wiped
        try:
            original(self, m)
        finally:
            m.wiped = wiped

    monkeypatch.setattr(Sim, "start", start_as_seed)
    found = _first_failure()
    assert found is not None, "400 seeds did not notice wiped members voting again"
    assert "election safety" in found[1] or "leader completeness" in found[1] or "state machine" in found[1]


SOAK = [(3, range(start, start + 1000)) for start in range(100_000, 107_000, 1000)] + \
       [(5, range(start, start + 1000)) for start in range(200_000, 204_000, 1000)]


@pytest.mark.soak
@pytest.mark.parametrize("nodes, seeds", SOAK, ids=lambda v: str(v.start) if isinstance(v, range) else str(v))
def test_soak(nodes, seeds):
    """11,000 seeds (every fault kind, membership changes and storage loss included), in chunks that each
    stay well inside the per-test timeout."""
    for seed in seeds:
        run_seed(seed, nodes=nodes)


@pytest.mark.soak
@pytest.mark.parametrize("nodes", [3, 5])
def test_soak_long_runs(nodes):
    for seed in range(300_000, 300_100):
        run_seed(seed, nodes=nodes, steps=3000)
