"""Pins the job id encoding documented in model.py: ids must never change between releases.

The expected ids were computed by hand: the canonical JSON written out below as a
literal string, hashed with sha256. If one of these tests fails, the encoding
changed and every existing queue would lose track of its jobs.
"""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cis490fleet import model
from cis490fleet.model import JobSpec, compute_job_id

PINNED = [
    (
        dict(model="mlp", mode="train", hyper={}, split_recipe="default", train_hosts=[], seed=0),
        '{"hyper":{},"mode":"train","model":"mlp","seed":0,"split_recipe":"default","train_hosts":[]}',
        "d33b480f0edccd67ac68709cb5e091f19ccc8d6389f5eba9bcf7c60eea8c0b42",
    ),
    (
        dict(model="mlp", mode="train", hyper={"lr": 1e-3, "epochs": 10.0}, split_recipe="holdout-20",
             train_hosts=["ws-a", "ws-b"], seed=7),
        '{"hyper":{"epochs":10,"lr":0.001},"mode":"train","model":"mlp","seed":7,"split_recipe":"holdout-20",'
        '"train_hosts":["ws-a","ws-b"]}',
        "a7dcb492f369f766ad2f08929f5e44a171ae6b99ff177d0f681dd99e3d2fb63e",
    ),
    (
        dict(model="logreg", mode="eval",
             hyper={"opt": {"name": "adam", "beta": 0.9}, "note": "café", "hidden": [64, 64], "flag": True,
                    "big": 1e16},
             split_recipe="default", train_hosts=("b", "a"), seed=-1),
        '{"hyper":{"big":1e+16,"flag":true,"hidden":[64,64],"note":"café","opt":{"beta":0.9,"name":"adam"}},'
        '"mode":"eval","model":"logreg","seed":-1,"split_recipe":"default","train_hosts":["b","a"]}',
        "ac6e50e90aa7d988108bd709e4f2215fe94a07a3fe7e066b3417dad23a9857ba",
    ),
]


@pytest.mark.parametrize("identity,canonical,expected", PINNED, ids=["empty", "typical", "nested-utf8"])
def test_job_id_is_pinned(identity, canonical, expected):
    assert hashlib.sha256(canonical.encode("utf-8")).hexdigest() == expected
    assert model.canonical_json({**identity, "train_hosts": list(identity["train_hosts"])}) == canonical
    assert compute_job_id(**identity) == expected


def test_job_spec_id_uses_the_same_encoding():
    identity, _, expected = PINNED[1]
    spec = JobSpec(**{**identity, "train_hosts": tuple(identity["train_hosts"])},
                   require_cuda=True, priority=9, name="x", after=("y",))
    assert spec.id == expected  # constraints and scheduling fields are not part of the identity


def _id(**changes):
    base = dict(model="mlp", mode="train", hyper={"lr": 0.001, "epochs": 10}, split_recipe="default",
                train_hosts=["a", "b"], seed=0)
    base.update(changes)
    return compute_job_id(**base)


def test_hyper_key_order_does_not_matter():
    assert _id(hyper={"lr": 0.001, "epochs": 10}) == _id(hyper={"epochs": 10, "lr": 0.001})


def test_1e_minus_3_and_0_001_are_one_job():
    assert _id(hyper={"lr": 1e-3, "epochs": 10}) == _id(hyper={"lr": 0.001, "epochs": 10})


def test_integral_floats_are_integers():
    assert _id(hyper={"lr": 0.001, "epochs": 10.0}) == _id(hyper={"lr": 0.001, "epochs": 10})
    assert _id(seed=3.0) == _id(seed=3)
    assert model.canonical_json(-0.0) == "0"
    assert model.canonical_json(float(2**53 - 1)) == str(2**53 - 1)


def test_large_floats_keep_their_float_form():
    assert model.canonical_json(float(2**53)) == "9007199254740992.0"
    assert model.canonical_json(1e16) == "1e+16"
    assert model.canonical_json(2.5) == "2.5"
    assert model.canonical_json(0.1 + 0.2) == "0.30000000000000004"


def test_values_that_differ_give_different_ids():
    base = _id()
    assert _id(train_hosts=["b", "a"]) != base  # arrays keep their order
    assert _id(hyper={"lr": 0.001, "epochs": 11}) != base
    assert _id(hyper={"lr": 0.001, "epochs": 10, "flag": True}) != _id(hyper={"lr": 0.001, "epochs": 10, "flag": 1})
    assert _id(hyper={"lr": 0.001, "epochs": "10"}) != base
    assert _id(mode="eval") != base
    assert _id(split_recipe="holdout-20") != base
    assert _id(seed=1) != base


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(bad):
    with pytest.raises(ValueError, match="NaN and infinity"):
        _id(hyper={"lr": bad})


def test_unencodable_types_are_refused():
    with pytest.raises(TypeError, match="set"):
        _id(hyper={"lr": {0.1}})


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=8),
                          st.floats(allow_nan=False, allow_infinity=False))
_hyper = st.dictionaries(st.text(max_size=8), st.one_of(_json_scalars, st.lists(_json_scalars, max_size=3)),
                         max_size=6)


@given(_hyper)
def test_any_key_order_gives_one_id(hyper):
    reordered = dict(reversed(list(hyper.items())))
    assert _id(hyper=hyper) == _id(hyper=reordered)


@given(st.integers(-(2**53) + 1, 2**53 - 1))
def test_integral_float_and_int_agree(n):
    assert _id(hyper={"epochs": float(n)}) == _id(hyper={"epochs": n})


def test_manifest_round_trips_through_json():
    m = model.Manifest(
        fleet=model.FleetConfig(name="lab", peers=(("pi", "https://pi:8445"),), heartbeat_s=5.0, stale_after_s=20.0),
        trainer=model.TrainerConfig(hyper_keys=(("mlp", ("lr",)),), describe=("{python}", "d.py")),
        hosts=(model.HostSpec(id="ws", deny_jobs=("big*",), slots=2, capability={"cuda": True}),),
        jobs=(JobSpec(model="mlp", mode="train", hyper={"lr": 0.1}, train_hosts=("a",), allowed_hosts=("ws",),
                      name="j", after=("k",), retries=0),),
        source="x.toml", sweeps_expanded=0)
    assert model.Manifest.from_json(m.to_json()) == m


def test_accepted_keys_merge_the_wildcard():
    t = model.TrainerConfig(hyper_keys=(("*", ("seed_offset",)), ("mlp", ("lr",))))
    assert t.accepted_keys("mlp") == {"lr", "seed_offset"}
    assert t.accepted_keys("logreg") == {"seed_offset"}
    assert model.TrainerConfig().accepted_keys("mlp") is None
