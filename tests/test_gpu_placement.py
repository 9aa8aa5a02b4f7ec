"""GPUs as they are: slots from the coordinator's view, per-slot claims with VRAM accounting, multi-GPU jobs,
measured VRAM peaks. Pure policy first, then the real queue on SQLite files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cis490fleet import manifest as manifest_mod
from cis490fleet import policy
from cis490fleet.errors import BadRequest, ManifestError
from cis490fleet.jobstore import JobStore
from cis490fleet.model import FleetConfig, HostSpec, JobSpec, Manifest, normalize_capability

T0 = 1_700_000_000.0
TWO = normalize_capability({"cuda": True, "ram_gib": 64, "gpus": [
    {"index": 0, "name": "RTX 4090", "vram_gib": 24}, {"index": 1, "name": "RTX 3070", "vram_gib": 8}]})
PAIR = normalize_capability({"cuda": True, "ram_gib": 64, "gpus": [
    {"index": 0, "name": "A100", "vram_gib": 40}, {"index": 1, "name": "A100", "vram_gib": 40},
    {"index": 2, "name": "T4", "vram_gib": 16}]})


def job(**kw) -> JobSpec:
    return JobSpec(model=kw.pop("model", "mlp"), mode="train", **kw)


# -- pure policy --


def test_slots_are_planned_one_per_gpu_and_round_robin_beyond():
    assert policy.plan_slots(TWO) == [{"index": 0, "gpus": [0]}, {"index": 1, "gpus": [1]}]
    cap = policy.effective_capability({"cuda": True, "vram_gib": 24}, HostSpec(id="ws-a", slots=2))
    assert policy.plan_slots(cap) == [{"index": 0, "gpus": [0]}, {"index": 1, "gpus": [0]}]
    assert policy.plan_slots(normalize_capability({"slots": 3})) == [
        {"index": 0, "gpus": []}, {"index": 1, "gpus": []}, {"index": 2, "gpus": []}]


def test_min_vram_is_compared_with_the_slots_gpu_not_the_hosts_largest():
    big = job(min_vram_gib=16)
    assert policy.place_gpus(big, "ws", 16, [1], TWO["gpus"], [], host_share=False) == (
        None, "GPU 1 of host ws (8.0 GiB) has 8.0 GiB free; the job needs 16.0")
    assert policy.place_gpus(big, "ws", 16, [0], TWO["gpus"], [], host_share=False) == ([0], None)


def test_a_busy_gpu_is_shared_only_when_allowed_and_the_needs_fit_together():
    placed = [policy.Placed(0, 10.0, False)]
    refused = policy.place_gpus(job(min_vram_gib=10), "ws", 10, [0], TWO["gpus"], placed, host_share=False)
    assert refused == (None, "GPU 0 of host ws runs another job and is not shared (set gpu_share = true on the "
                             "host, or on every job that shares it)")
    assert policy.place_gpus(job(min_vram_gib=10), "ws", 10, [0], TWO["gpus"], placed, host_share=True) == ([0], None)
    assert policy.place_gpus(job(min_vram_gib=16), "ws", 16, [0], TWO["gpus"], placed, host_share=True) == (
        None, "GPU 0 of host ws (24.0 GiB) has 14.0 GiB free; the job needs 16.0")
    # Per job: both jobs must allow it.
    shared = [policy.Placed(0, 10.0, True)]
    assert policy.place_gpus(job(min_vram_gib=10, gpu_share=True), "ws", 10, [0], TWO["gpus"], shared,
                             host_share=False) == ([0], None)
    assert policy.place_gpus(job(min_vram_gib=10, gpu_share=True), "ws", 10, [0], TWO["gpus"], placed,
                             host_share=False)[0] is None
    # The worker's reported free VRAM lowers what the accounting leaves.
    assert policy.place_gpus(job(min_vram_gib=10), "ws", 10, [0], TWO["gpus"], placed, host_share=True,
                             free_reported={0: 6.0}) == (
        None, "GPU 0 of host ws (24.0 GiB) has 6.0 GiB free; the job needs 10.0")


def test_a_job_without_gpu_need_gets_the_slots_gpu_only_when_free():
    placed = [policy.Placed(0, 4.0, False)]
    assert policy.place_gpus(job(), "ws", 0, [0], TWO["gpus"], [], host_share=False) == ([0], None)
    assert policy.place_gpus(job(), "ws", 0, [0], TWO["gpus"], placed, host_share=False) == ([], None)
    assert policy.place_gpus(job(), "ws", 0, [], [], [], host_share=False) == ([], None)
    assert policy.place_gpus(job(require_cuda=True), "pi", 0, [], [], [], host_share=False) == (
        None, "this slot of host pi has no GPU")


def test_multi_gpu_jobs_take_n_gpus_of_the_same_model():
    two = job(gpus=2)
    assert policy.place_gpus(two, "ws", 0, [1], PAIR["gpus"], [], host_share=False) == ([1, 0], None)
    assert policy.place_gpus(two, "ws", 0, [2], PAIR["gpus"], [], host_share=False) == (
        None, "the job needs 2 GPUs of one host like GPU 2 (T4); host ws has 1 free")
    assert policy.place_gpus(job(gpus=2, mixed_gpus=True), "ws", 0, [2], PAIR["gpus"], [],
                             host_share=False) == ([2, 0], None)
    busy = [policy.Placed(0, 1.0, False)]
    assert policy.place_gpus(job(gpus=3, mixed_gpus=True), "ws", 0, [1], PAIR["gpus"], busy, host_share=False) == (
        None, "the job needs 3 GPUs of one host; host ws has 2 free")
    assert policy.static_refusals(job(gpus=4), "ws", PAIR, None) == ["host ws has 3 GPU(s); the job needs 4 (gpus)"]


def test_vram_need_is_the_manifests_else_the_measured_peak():
    assert policy.vram_need(job(min_vram_gib=6), 9.5) == 6
    assert policy.vram_need(job(), 9.5) == 9.5
    assert policy.vram_need(job(), None) == 0.0


# -- manifest fields --


def test_manifest_reads_the_gpu_fields_and_names_bad_ones():
    text = """
[[hosts]]
id = "ws-a"
slots = 2
gpu_share = true
speed = 4.0

[[jobs]]
model = "mlp"
mode = "train"
gpus = 2
gpu_share = true
mixed_gpus = true
expected_minutes = 90
"""
    m = manifest_mod.parse(text, "m.toml")
    assert (m.hosts[0].gpu_share, m.hosts[0].speed) == (True, 4.0)
    j = m.jobs[0]
    assert (j.gpus, j.gpu_share, j.mixed_gpus, j.expected_minutes) == (2, True, True, 90.0)
    assert JobSpec.from_json(j.to_json()) == j
    bad = text.replace("gpus = 2", "gpus = 0").replace("speed = 4.0", "speed = 0").replace(
        "expected_minutes = 90", 'expected_minutes = "long"')
    with pytest.raises(ManifestError) as err:
        manifest_mod.parse(bad, "m.toml")
    assert err.value.problems == [
        "m.toml: hosts[0] (id=ws-a).speed: expected a number > 0, got 0",
        "m.toml: jobs[0] (model=mlp).gpus: expected an integer >= 1, got 0",
        "m.toml: jobs[0] (model=mlp).expected_minutes: expected a number > 0, got \"long\"",
    ]


def test_jobs_without_the_gpu_fields_keep_their_class_key():
    assert job(min_vram_gib=6).constraint_key() == (
        '{"allowed_hosts":[],"min_ram_gib":0,"min_vram_gib":6,"model":"mlp","prefer_cuda":false,'
        '"require_cuda":false}')
    assert '"gpus":2' in job(gpus=2).constraint_key()


# -- the queue --


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "queue.sqlite3")
    yield s
    s.close()


def sync(store, *jobs, hosts=()):
    return store.execute({"op": "sync_manifest", "now": T0, "manifest": Manifest(
        fleet=FleetConfig(), hosts=tuple(hosts), jobs=tuple(jobs)).to_json()})


def claim(store, slot, host="ws", lease="L1", cap=TWO, now=T0):
    return store.execute({"op": "claim", "now": now, "host": host, "capability": cap, "lease": lease,
                          "slot": slot})


def test_register_answers_the_slots_the_manifest_declares(store):
    sync(store, hosts=[HostSpec(id="ws-a", slots=2)])
    one_gpu = {"cuda": True, "gpus": [{"index": 0, "name": "RTX 4090", "vram_gib": 24}], "slots": 1}
    answer = store.execute({"op": "register_worker", "now": T0, "host": "ws-a", "capability": one_gpu})
    assert answer["slots"] == [{"index": 0, "gpus": [0]}, {"index": 1, "gpus": [0]}]
    answer = store.execute({"op": "register_worker", "now": T0, "host": "ws-b", "capability": TWO})
    assert answer["slots"] == [{"index": 0, "gpus": [0]}, {"index": 1, "gpus": [1]}]
    assert {w["host"]: w["slots"] for w in store.workers(T0)} == {"ws-a": 2, "ws-b": 2}


def test_a_16_gib_job_never_lands_on_the_8_gib_card(store):
    big = job(min_vram_gib=16, require_cuda=True)
    sync(store, big)
    assert claim(store, {"index": 1, "gpus": [1]}) == {"job": None}
    got = claim(store, {"index": 0, "gpus": [0]})
    assert (got["job_id"], got["gpus"], got["slot"]) == (big.id, [0], 0)


def test_two_jobs_share_a_card_while_their_vram_fits_and_the_coordinator_accounts_it(store):
    a, b, c = (job(seed=i, min_vram_gib=10, require_cuda=True) for i in range(3))
    sync(store, a, b, c, hosts=[HostSpec(id="ws", slots=3, gpu_share=True)])
    one = normalize_capability({"cuda": True, "gpus": [{"index": 0, "name": "RTX 4090", "vram_gib": 24}]})
    assert claim(store, {"index": 0}, cap=one, lease="L1")["gpus"] == [0]
    assert claim(store, {"index": 1}, cap=one, lease="L2")["gpus"] == [0]
    assert claim(store, {"index": 2}, cap=one, lease="L3") == {"job": None}  # 4 GiB left, 10 needed
    detail = store.job(c.id, T0)
    assert any("GPU 0 of host ws (24.0 GiB) has 4.0 GiB free; the job needs 10.0" in r for r in detail["why_pending"])
    store.execute({"op": "release", "now": T0, "job_id": a.id, "host": "ws", "lease": "L1"})
    assert claim(store, {"index": 2}, cap=one, lease="L3")["gpus"] == [0]


def test_without_sharing_a_busy_card_takes_only_jobs_that_need_no_gpu(store):
    gpu_job, cpu_job = job(seed=0, require_cuda=True), job(seed=1)
    sync(store, gpu_job, cpu_job, hosts=[HostSpec(id="ws", slots=2)])
    one = normalize_capability({"cuda": True, "vram_gib": 24})
    assert claim(store, {"index": 0}, cap=one)["gpus"] == [0]
    got = claim(store, {"index": 1}, cap=one, lease="L2")
    assert (got["job_id"], got["gpus"]) == (cpu_job.id, [])


def test_a_multi_gpu_job_takes_two_cards_of_one_model(store):
    ddp = job(gpus=2)
    sync(store, ddp)
    got = claim(store, {"index": 0, "gpus": [{"index": 0, "free_vram_gib": 39.5}]}, cap=PAIR)
    assert got["gpus"] == [0, 1]
    assert claim(store, {"index": 1}, cap=PAIR, lease="L2") == {"job": None}


def test_a_claim_with_a_bad_slot_is_refused_with_the_field_named(store):
    sync(store, job())
    with pytest.raises(BadRequest, match=r"claim: field 'slot.gpus\[0\].free_vram_gib' must be a number of GiB"):
        claim(store, {"index": 0, "gpus": [{"index": 0, "free_vram_gib": -1}]})
    with pytest.raises(BadRequest, match=r"claim: field 'slot.index' must be a slot number"):
        claim(store, {"index": "x"})


def test_measured_peak_is_kept_shown_and_used_for_a_rerun(store):
    first, rerun = job(seed=0, require_cuda=True), job(seed=1, require_cuda=True)
    sync(store, first, hosts=[HostSpec(id="ws", gpu_share=True, slots=2)])
    one = normalize_capability({"cuda": True, "gpus": [{"index": 0, "name": "RTX 4090", "vram_gib": 24}]})
    got = claim(store, {"index": 0}, cap=one)
    for peak in (3.0, 15.5, 9.0):
        store.execute({"op": "heartbeat", "now": T0, "job_id": got["job_id"], "host": "ws", "lease": "L1",
                       "progress": {"epoch": 1, "peak_vram_gib": peak}})
    assert store.job(first.id, T0)["peak_vram_gib"] == 15.5
    sync(store, first, rerun, hosts=[HostSpec(id="ws", gpu_share=True, slots=2)])
    # 24 - 0 (the first job's need was unknown when placed) leaves room; the rerun is accounted 15.5.
    assert claim(store, {"index": 1}, cap=one, lease="L2")["gpus"] == [0]
    placement = store._conn().execute("SELECT placement FROM attempts WHERE job = ?", (rerun.id,)).fetchone()[0]
    assert '"vram_gib":15.5' in placement


def test_the_example_labs_gpu_hosts_behave_as_its_comments_say():
    from pathlib import Path

    m = manifest_mod.load(Path(__file__).resolve().parent.parent / "etc" / "training_manifest.toml.example")
    ws_a = policy.effective_capability({"cuda": True, "gpus": [{"index": 0, "name": "RTX 4090", "vram_gib": 24}]},
                                       m.host("ws-a"))
    ws_b = policy.effective_capability({"cuda": True, "gpus": [{"index": 0, "name": "RTX 3070", "vram_gib": 8}]},
                                       m.host("ws-b"))
    large = next(j for j in m.jobs if j.name == "mlp-large")
    medium = next(j for j in m.jobs if j.model == "mlp" and j.min_vram_gib == 6)
    # ws-a: two slots on its one card, shared while 16 + 6 fit in 24, but not 16 + 16.
    assert policy.plan_slots(ws_a) == [{"index": 0, "gpus": [0]}, {"index": 1, "gpus": [0]}]
    assert m.host("ws-a").gpu_share
    placed = [policy.Placed(0, large.min_vram_gib, False)]
    assert policy.place_gpus(medium, "ws-a", 6, [0], ws_a["gpus"], placed, host_share=True) == ([0], None)
    assert policy.place_gpus(large, "ws-a", 16, [0], ws_a["gpus"], placed, host_share=True)[0] is None
    # ws-b: one job at a time on its 8 GiB; mlp-large never goes there.
    assert policy.plan_slots(ws_b) == [{"index": 0, "gpus": [0]}]
    assert policy.static_refusals(large, "ws-b", ws_b, m.host("ws-b")) == [
        "host ws-b has 8.0 GiB VRAM; the job needs 16.0"]
    assert policy.place_gpus(medium, "ws-b", 6, [0], ws_b["gpus"], [policy.Placed(0, 0.0, False)],
                             host_share=False)[0] is None
    # The declared speeds rank the hosts as the comments say.
    assert [h.id for h in sorted(m.hosts, key=lambda h: -(h.speed or 1.0))] == ["ws-a", "ws-b", "win-cpu", "pi"]


@pytest.mark.skipif(__import__("os").name == "nt", reason="a stand-in nvidia-smi needs a POSIX shebang")
def test_free_vram_is_what_nvidia_smi_reports_now(tmp_path, monkeypatch):
    from test_capability import fake_smi

    from cis490fleet import capability

    bin_dir = fake_smi(tmp_path, """
        import sys
        assert "--query-gpu=index,memory.free" in sys.argv, sys.argv
        print("0, 20480")
        print("1, 512")
        print("garbage")
    """)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert capability.free_vram() == {0: 20.0, 1: 0.5}
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert capability.free_vram() == {}


def test_a_waiting_multi_gpu_job_is_not_starved_by_single_gpu_jobs(store):
    singles = [job(seed=i, require_cuda=True) for i in range(3)]
    ddp = job(seed=9, gpus=2, priority=1)
    cpu = job(seed=10, model="logreg")
    sync(store, *singles)
    assert claim(store, {"index": 1}, cap=PAIR, lease="L1")["gpus"] == [1]
    sync(store, *singles, ddp, cpu)
    # GPU 0 is free but kept for the two-GPU job; a job that needs no GPU still runs, on the CPU.
    got = claim(store, {"index": 0}, cap=PAIR, lease="L2")
    assert (got["job_id"], got["gpus"]) == (cpu.id, [])
    # The T4 (GPU 2) is no use to a job that wants two cards of one model: it still takes single jobs.
    assert claim(store, {"index": 2}, cap=PAIR, lease="L3")["gpus"] == [2]
    store.execute({"op": "release", "now": T0, "job_id": singles[0].id, "host": "ws", "lease": "L1"})
    got = claim(store, {"index": 0}, cap=PAIR, lease="L4")
    assert (got["job_id"], got["gpus"]) == (ddp.id, [0, 1])


def test_a_multi_gpu_job_that_never_fits_here_holds_no_gpu_back(store):
    ddp, single = job(seed=9, gpus=2, priority=1), job(seed=1, require_cuda=True)
    sync(store, ddp, single)
    # TWO's cards are of two models: the two-GPU job can never run here, so nothing is kept for it.
    got = claim(store, {"index": 0}, cap=TWO)
    assert (got["job_id"], got["gpus"]) == (single.id, [0])
    assert any("the job needs 2 GPUs of one host like GPU 1 (RTX 3070); host ws has 1 free" in r
               for r in store.job(ddp.id, T0)["why_pending"])


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.floats(0, 30), st.booleans(), st.booleans()),
                max_size=25), st.booleans())
def test_placements_never_overfill_a_card_nor_share_one_that_may_not_be(asks, host_share):
    """However claims come, the VRAM accounted on a card never exceeds it, and a card holds two jobs only
    when sharing is allowed for all of them."""
    cards = PAIR["gpus"]
    placed: list[policy.Placed] = []
    for slot, gpus, need, share, cuda in asks:
        spec = job(gpus=gpus, gpu_share=share, require_cuda=cuda)
        given, refusal = policy.place_gpus(spec, "ws", need, [slot], cards, placed, host_share=host_share)
        assert (given is None) == (refusal is not None)
        if given:
            assert len(given) == max(gpus, 1) or not policy.needs_gpu(spec)
            placed += [policy.Placed(g, need, share) for g in given]
    for card in cards:
        here = [p for p in placed if p.gpu == card["index"]]
        assert sum(p.vram_gib for p in here) <= card["vram_gib"] + 1e-9
        if len(here) > 1:
            assert host_share or all(p.share for p in here)
