"""jobs submit: jobs added without editing the manifest, checked as the manifest's are, kept across reloads."""

from __future__ import annotations

import json

import pytest

from cis490fleet import submission
from conftest import OPERATOR_TOKEN
from test_ops_cli import jobs


@pytest.fixture(autouse=True)
def operator(monkeypatch):
    monkeypatch.setenv("CIS490_OPERATOR_TOKEN", OPERATOR_TOKEN)

MANIFEST = """
[fleet]
max_attempts = 2

[trainer]
hyper_keys = { mlp = ["lr", "epochs"] }

[[jobs]]
name = "baseline"
model = "mlp"
mode = "train"
hyper = { lr = 0.1, epochs = 2 }
"""

SWEEP = """
[[sweeps]]
name = "lr"
model = "mlp"
mode = "sweep"
hyper = { lr = [1e-3, 1e-4], epochs = 2 }
after = ["baseline"]
"""


def listed(url) -> dict[str, dict]:
    code, out, err = jobs(url, "list", "--json")
    assert code == 0, err
    return {j["name"] or j["id"]: j for j in json.loads(out)["jobs"]}


def test_flags_make_a_job_or_a_sweep():
    assert submission.snippet_from_flags(model="mlp", mode="x", hyper=["lr=1e-3", "act=relu"], sweep=[]) == (
        '[[jobs]]\nmodel = "mlp"\nmode = "x"\nhyper = { lr = 0.001, act = "relu" }\n')
    assert submission.snippet_from_flags(model="mlp", mode="x", hyper=["epochs=3"], sweep=["hyper.lr=1e-3,1e-4"],
                                         name="s") == (
        '[[sweeps]]\nname = "s"\nmodel = "mlp"\nmode = "x"\nhyper = { epochs = 3, lr = [0.001, 0.0001] }\n')


def test_a_sweep_is_submitted_after_a_dry_run_and_survives_a_reload(live_server, tmp_path):
    server = live_server(MANIFEST)
    snippet = tmp_path / "sweep.toml"
    snippet.write_text(SWEEP)

    code, out, err = jobs(server.url, "submit", str(snippet), "--dry-run")
    assert code == 0, err
    assert out.startswith("would add 2 job(s):") and "lr-0" in out and "lr-1" in out
    assert set(listed(server.url)) == {"baseline"}

    code, out, err = jobs(server.url, "submit", str(snippet))
    assert code == 0, err
    assert out.startswith("added 2 job(s)")
    now = listed(server.url)
    assert set(now) == {"baseline", "lr-0", "lr-1"}
    assert now["lr-0"]["origin"] == "submitted" and now["baseline"]["origin"] == "manifest"
    assert now["lr-0"]["hyper"] == {"lr": 1e-3, "epochs": 2}

    code, out, err = jobs(server.url, "reload")
    assert code == 0, err
    assert "0 removed" in out
    after = listed(server.url)
    assert after["lr-1"]["in_manifest"] is True and after["lr-1"]["status"] == "pending"

    code, out, _ = jobs(server.url, "submit", str(snippet))  # the same jobs again add nothing
    assert code == 0 and out.startswith("added 0 job(s)")
    assert len(listed(server.url)) == 3


def test_a_submission_is_checked_like_the_manifest_and_adds_nothing_when_wrong(live_server, tmp_path):
    server = live_server(MANIFEST)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[jobs]]\nmodel = "mlp"\nmode = "x"\nhyper = { lr = 1e-3, momentum = 0.9 }\nafter = ["nope"]\n')
    code, _, err = jobs(server.url, "submit", str(bad))
    assert code != 0
    assert "does not accept hyper key 'momentum'" in err and "no job or sweep is named 'nope'" in err
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("[fleet]\nmax_attempts = 9\n")
    code, _, err = jobs(server.url, "submit", str(fleet))
    assert code != 0 and "only [[jobs]] and [[sweeps]] can be submitted, not fleet" in err
    assert set(listed(server.url)) == {"baseline"}


def test_a_sweep_from_flags(live_server):
    server = live_server(MANIFEST)
    code, out, err = jobs(server.url, "submit", "--model", "mlp", "--mode", "quick", "--hyper", "epochs=1",
                          "--sweep", "hyper.lr=0.1,0.01", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["added"] == 2
    assert sorted(j["hyper"]["lr"] for j in answer["jobs"]) == [0.01, 0.1]
    code, _, err = jobs(server.url, "submit", "--model", "mlp", "--mode", "quick", "--sweep", "lr=1,2")
    assert code == 2 and "write hyper.KEY=V1,V2" in err
