"""Eligibility: every rule as a table of cases, each refusal checked word for word."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cis490fleet import policy
from cis490fleet.model import HostSpec, JobSpec, normalize_capability

CUDA24 = normalize_capability({"cuda": True, "vram_gib": 24, "ram_gib": 64, "slots": 2})
CUDA8 = normalize_capability({"cuda": True, "gpus": [{"index": 0, "name": "RTX 3070", "vram_gib": 8}], "ram_gib": 32})
CPU = normalize_capability({"cuda": False, "ram_gib": 16})
PI = normalize_capability({"ram_gib": 4})


def job(**kw) -> JobSpec:
    return JobSpec(model=kw.pop("model", "mlp"), mode="train", **kw)


# -- effective_capability --


@pytest.mark.parametrize("detected,spec,expected", [
    ({}, None, {"cuda": False, "vram_gib": 0.0, "ram_gib": 0.0, "slots": 1, "cores": 1, "gpus": []}),
    ({"cuda": True, "gpus": [{"index": 0, "vram_gib": 24}], "ram_gib": 64}, None,
     {"cuda": True, "vram_gib": 24.0, "ram_gib": 64.0, "slots": 1}),
    ({"cuda": True, "gpus": [{"index": 0, "vram_gib": 24}]}, HostSpec(id="a", capability={"vram_gib": 20}),
     {"cuda": True, "vram_gib": 20.0}),
    ({"cuda": True, "gpus": [{"index": 0, "vram_gib": 24}], "vram_gib": 24}, HostSpec(id="a", capability={"cuda": False}),
     {"cuda": False, "vram_gib": 0.0, "gpus": [], "slots": 1}),
    ({"cuda": True, "vram_gib": 24, "gpus": [{"index": 0, "vram_gib": 24}]},
     HostSpec(id="a", capability={"gpus": [{"index": 0, "name": "x", "vram_gib": 12}, {"index": 1, "name": "y", "vram_gib": 16}]}),
     {"cuda": True, "vram_gib": 16.0, "slots": 2}),
    ({"ram_gib": 8, "slots": 4}, HostSpec(id="a", slots=1), {"slots": 1, "ram_gib": 8.0}),
    ({"ram_gib": 8}, HostSpec(id="a", slots=3, capability={"slots": 2, "ram_gib": 2}), {"slots": 3, "ram_gib": 2.0}),
    ({"ram_gib": 8, "cores": 4, "host": "ws"}, HostSpec(id="ws"), {"ram_gib": 8.0, "cores": 4, "host": "ws"}),
], ids=["empty", "detected-only", "vram-override", "cuda-off", "gpus-override", "slots", "slots-wins", "plain-spec"])
def test_effective_capability(detected, spec, expected):
    cap = policy.effective_capability(detected, spec)
    assert {k: cap[k] for k in expected} == expected
    assert cap == normalize_capability(cap)


def test_effective_capability_does_not_change_its_inputs():
    detected = {"cuda": True, "vram_gib": 24}
    spec = HostSpec(id="a", capability={"cuda": False})
    policy.effective_capability(detected, spec)
    assert detected == {"cuda": True, "vram_gib": 24} and spec.capability == {"cuda": False}


# -- static_refusals --


@pytest.mark.parametrize("spec_job,host,cap,spec,expected", [
    (job(), "ws-a", CUDA24, None, []),
    (job(require_cuda=True), "pi", PI, None, ["host pi has no CUDA; the job requires it"]),
    (job(require_cuda=True), "ws-b", CUDA8, None, []),
    (job(min_vram_gib=12), "ws-b", CUDA8, None, ["host ws-b has 8.0 GiB VRAM; the job needs 12.0"]),
    (job(min_vram_gib=8), "ws-b", CUDA8, None, []),
    (job(min_vram_gib=0.5), "win-cpu", CPU, None, ["host win-cpu has 0.0 GiB VRAM; the job needs 0.5"]),
    (job(min_ram_gib=8), "pi", PI, None, ["host pi has 4.0 GiB RAM; the job needs 8.0"]),
    (job(min_ram_gib=16), "win-cpu", CPU, None, []),
    (job(allowed_hosts=("ws-a", "ws-b")), "pi", PI, None,
     ["the job may run only on ws-a, ws-b (allowed_hosts); host pi is not one of them"]),
    (job(allowed_hosts=("ws-a", "ws-b")), "ws-b", CUDA8, None, []),
    (job(), "pi", PI, HostSpec(id="pi", deny_jobs=("*",)),
     ["host pi denies model 'mlp' (deny_jobs '*' in its [[hosts]] entry)"]),
    (job(model="mlp-large"), "pi", PI, HostSpec(id="pi", deny_jobs=("logreg", "mlp*")),
     ["host pi denies model 'mlp-large' (deny_jobs 'mlp*' in its [[hosts]] entry)"]),
    (job(), "pi", PI, HostSpec(id="pi", allow_jobs=("logreg", "tiny-*")),
     ["host pi allows only 'logreg', 'tiny-*' (allow_jobs in its [[hosts]] entry); the job is model 'mlp'"]),
    (job(model="tiny-mlp"), "pi", PI, HostSpec(id="pi", allow_jobs=("logreg", "tiny-*")), []),
    (job(), "pi", PI, HostSpec(id="pi", allow_jobs=()),
     ["host pi allows only nothing (allow_jobs in its [[hosts]] entry); the job is model 'mlp'"]),
    (job(model="logreg"), "pi", PI, HostSpec(id="pi", allow_jobs=("logreg",), deny_jobs=("log*",)),
     ["host pi denies model 'logreg' (deny_jobs 'log*' in its [[hosts]] entry)"]),  # deny wins
    (job(model="MLP"), "pi", PI, HostSpec(id="pi", deny_jobs=("mlp",)), []),  # globs are case-sensitive everywhere
    (job(model="mlp"), "pi", PI, HostSpec(id="pi", deny_jobs=("m[a-k]p",)), []),
    (job(model="mlp"), "pi", PI, HostSpec(id="pi", deny_jobs=("m[k-m]p",)),
     ["host pi denies model 'mlp' (deny_jobs 'm[k-m]p' in its [[hosts]] entry)"]),
    (job(require_cuda=True, min_vram_gib=16, min_ram_gib=8, allowed_hosts=("ws-a",)), "pi", PI,
     HostSpec(id="pi", deny_jobs=("mlp",)),
     ["the job may run only on ws-a (allowed_hosts); host pi is not one of them",
      "host pi denies model 'mlp' (deny_jobs 'mlp' in its [[hosts]] entry)",
      "host pi has no CUDA; the job requires it",
      "host pi has 0.0 GiB VRAM; the job needs 16.0",
      "host pi has 4.0 GiB RAM; the job needs 8.0"]),
])
def test_static_refusals(spec_job, host, cap, spec, expected):
    assert policy.static_refusals(spec_job, host, cap, spec) == expected


def test_static_refusals_accept_a_raw_capability():
    assert policy.static_refusals(job(require_cuda=True, min_vram_gib=1, min_ram_gib=1), "x", {}, None) == [
        "host x has no CUDA; the job requires it", "host x has 0.0 GiB VRAM; the job needs 1.0",
        "host x has 0.0 GiB RAM; the job needs 1.0"]


# -- prefer_cuda --


@pytest.mark.parametrize("prefer,cap,available,refused", [
    (True, CPU, True, True),
    (True, CPU, False, False),
    (True, CUDA8, True, False),
    (False, CPU, True, False),
])
def test_prefer_cuda_refusal(prefer, cap, available, refused):
    got = policy.prefer_cuda_refusal(job(prefer_cuda=prefer), "win-cpu", cap, available)
    if refused:
        assert got == ("the job prefers CUDA and a live CUDA host is eligible for it; host win-cpu has no CUDA "
                       "and takes it only when no such host is")
    else:
        assert got is None


# -- slots --


@pytest.mark.parametrize("held,slots,expected", [
    (0, 1, None),
    (1, 2, None),
    (1, 1, "host ws-a already runs 1 job in its 1 slot; it takes another when one finishes (or raise its slots)"),
    (2, 2, "host ws-a already runs 2 jobs in its 2 slots; it takes another when one finishes (or raise its slots)"),
    (3, 2, "host ws-a already runs 3 jobs in its 2 slots; it takes another when one finishes (or raise its slots)"),
])
def test_slot_refusal(held, slots, expected):
    assert policy.slot_refusal("ws-a", held, slots) == expected


# -- dependencies --


@pytest.mark.parametrize("status,expected", [
    ("completed", []),
    ("pending", ["waits for 'prep', which is pending"]),
    ("claimed", ["waits for 'prep', which a worker has just claimed"]),
    ("running", ["waits for 'prep', which is running"]),
    ("failed", ["waits for 'prep', which failed: requeue it"]),
    ("cancelled", ["waits for 'prep', which was cancelled: requeue it"]),
    (None, ["waits for 'prep', which is not in the queue: add it to the manifest and reload, or remove it from 'after'"]),
])
def test_dependency_refusals(status, expected):
    assert policy.dependency_refusals(job(after=("prep",)), {"prep": status}) == expected


def test_dependency_refusals_one_per_unfinished_dependency_in_order():
    j = job(after=("a", "b", "c", "d"))
    assert policy.dependency_refusals(j, {"a": "completed", "b": "failed", "d": "running"}) == [
        "waits for 'b', which failed: requeue it",
        "waits for 'c', which is not in the queue: add it to the manifest and reload, or remove it from 'after'",
        "waits for 'd', which is running",
    ]
    assert policy.dependency_refusals(job(), {}) == []


# -- refusals: all together --


def test_refusals_empty_means_eligible():
    assert policy.refusals(job(require_cuda=True, after=("prep",)), "ws-a", CUDA24, HostSpec(id="ws-a"), held=1,
                           slots=2, cuda_host_available=True, dep_status={"prep": "completed"}) == []


def test_refusals_combine_every_rule_in_order():
    j = job(min_ram_gib=32, prefer_cuda=True, after=("prep",))
    assert policy.refusals(j, "win-cpu", CPU, HostSpec(id="win-cpu", slots=1), held=1, slots=1,
                           cuda_host_available=True, dep_status={"prep": "failed"}) == [
        "host win-cpu has 16.0 GiB RAM; the job needs 32.0",
        "the job prefers CUDA and a live CUDA host is eligible for it; host win-cpu has no CUDA and takes it only "
        "when no such host is",
        "host win-cpu already runs 1 job in its 1 slot; it takes another when one finishes (or raise its slots)",
        "waits for 'prep', which failed: requeue it",
    ]


def test_the_example_lab():
    from pathlib import Path

    from cis490fleet import manifest

    m = manifest.load(Path(__file__).resolve().parent.parent / "etc" / "training_manifest.toml.example")
    caps = {h.id: policy.effective_capability({"ram_gib": 2}, h) for h in m.hosts}
    done = {j.name: "completed" for j in m.jobs if j.name}

    def eligible(j):
        return [h for h in caps if not policy.refusals(j, h, caps[h], m.host(h), held=0, slots=caps[h]["slots"],
                                                       cuda_host_available=True, dep_status=done)]

    large = next(j for j in m.jobs if j.name == "mlp-large")
    assert eligible(large) == ["ws-a"]
    assert eligible(next(j for j in m.jobs if j.name == "pi-smoke")) == ["pi"]
    assert all("pi" not in eligible(j) for j in m.jobs if j.model == "mlp")
    assert all(eligible(j) for j in m.jobs), "every example job can run somewhere"


# -- properties --

_caps = st.builds(lambda cuda, vram, ram: normalize_capability({"cuda": cuda, "vram_gib": vram, "ram_gib": ram}),
                  st.booleans(), st.floats(0, 80), st.floats(0, 256))
_jobs = st.builds(lambda model, cuda, prefer, vram, ram, hosts, after: job(
    model=model, require_cuda=cuda, prefer_cuda=prefer, min_vram_gib=vram, min_ram_gib=ram, allowed_hosts=hosts,
    after=after),
    st.sampled_from(["mlp", "logreg", "mlp-large"]), st.booleans(), st.booleans(), st.floats(0, 48),
    st.floats(0, 128), st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True).map(tuple),
    st.lists(st.sampled_from(["p", "q"]), max_size=2, unique=True).map(tuple))
_specs = st.one_of(st.none(), st.builds(
    lambda allow, deny: HostSpec(id="a", allow_jobs=tuple(allow), deny_jobs=tuple(deny)),
    st.lists(st.sampled_from(["*", "mlp*", "logreg"]), max_size=2), st.lists(st.sampled_from(["*", "mlp", "log*"]),
                                                                              max_size=2)))
_statuses = st.dictionaries(st.sampled_from(["p", "q"]),
                            st.sampled_from([None, "pending", "claimed", "running", "completed", "failed", "cancelled"]))


@given(_jobs, _caps, _specs, st.integers(0, 3), st.integers(1, 3), st.booleans(), _statuses)
def test_refusals_are_the_sum_of_the_parts(j, cap, spec, held, slots, available, deps):
    parts = policy.static_refusals(j, "a", cap, spec)
    parts += [r for r in (policy.prefer_cuda_refusal(j, "a", cap, available), policy.slot_refusal("a", held, slots))
              if r]
    parts += policy.dependency_refusals(j, deps)
    got = policy.refusals(j, "a", cap, spec, held=held, slots=slots, cuda_host_available=available, dep_status=deps)
    assert got == parts
    assert all(isinstance(r, str) and r and "\n" not in r for r in got)


@given(_jobs, _caps, _specs)
def test_more_vram_and_ram_never_add_a_refusal(j, cap, spec):
    bigger = {**cap, "vram_gib": cap["vram_gib"] + 8, "ram_gib": cap["ram_gib"] + 8}
    assert len(policy.static_refusals(j, "a", bigger, spec)) <= len(policy.static_refusals(j, "a", cap, spec))


@given(_jobs, _caps, st.lists(st.sampled_from(["*", "mlp*", "logreg"]), max_size=3))
def test_deny_wins_over_any_allow(j, cap, allow):
    spec = HostSpec(id="a", allow_jobs=tuple(allow) + (j.model,), deny_jobs=(j.model,))
    assert any("denies model" in r for r in policy.static_refusals(j, "a", cap, spec))
    assert not any("allows only" in r for r in policy.static_refusals(j, "a", cap, spec))
