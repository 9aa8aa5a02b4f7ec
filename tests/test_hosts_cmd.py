"""`jobs hosts add | list | rotate | revoke` against a real coordinator: the key is printed once, then never."""

from __future__ import annotations

import io
import json

from conftest import OPERATOR_TOKEN, manifest_toml

from cis490fleet import ops


def jobs(url: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ops.main(["--receiver", url, *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_add_prints_the_key_once_with_the_enroll_commands_and_list_never_shows_it(live_server, monkeypatch):
    srv = live_server(manifest_toml(1, extra='[[hosts]]\nid = "declared"\n'))
    monkeypatch.setenv("CIS490_OPERATOR_TOKEN", OPERATOR_TOKEN)
    code, out, _ = jobs(srv.url, "hosts", "add", "ws5")
    key = srv.coordinator.host_key("ws5").hex()
    assert code == 0 and out.count(key) >= 1 and "Linux" in out and "Windows" in out and "--host-key-file" in out
    code, out, _ = jobs(srv.url, "hosts", "list")
    assert code == 0 and key not in out and "ws5" in out and "declared" in out
    code, out, _ = jobs(srv.url, "hosts", "add", "ws5")
    assert code != 0  # a second add would replace the key silently: rotate says so
    code, out, _ = jobs(srv.url, "hosts", "rotate", "ws5", "--json")
    assert code == 0 and json.loads(out)["key"] != key
    code, out, _ = jobs(srv.url, "hosts", "revoke", "ws5")
    assert code == 0 and srv.coordinator.host_key("ws5") is None
    listed = json.loads(jobs(srv.url, "hosts", "list", "--json")[1])["hosts"]
    assert [h["revoked_by"] for h in listed if h["host"] == "ws5"] == ["operator"]


def test_hosts_need_the_operator_token(live_server, monkeypatch):
    srv = live_server(manifest_toml(1))
    monkeypatch.delenv("CIS490_OPERATOR_TOKEN", raising=False)
    code, _, err = jobs(srv.url, "hosts", "add", "ws5")
    assert code == 4 and "CIS490_OPERATOR_TOKEN" in err and srv.coordinator.host_key("ws5") is None


def test_jobs_show_says_which_operator_cancelled_and_requeued(live_server, monkeypatch):
    srv = live_server(manifest_toml(1))
    monkeypatch.setenv("CIS490_OPERATOR_TOKEN", OPERATOR_TOKEN)
    job_id = srv.call("GET", "/v1/jobs")[2]["jobs"][0]["id"]
    assert jobs(srv.url, "cancel", job_id)[0] == 0 and jobs(srv.url, "requeue", job_id)[0] == 0
    code, out, _ = jobs(srv.url, "show", job_id)
    section = out.split("operator actions", 1)[1]
    assert code == 0 and "cancel" in section and "requeue" in section and section.count("operator") >= 2


def test_jobs_status_warns_about_the_legacy_mode(live_server):
    legacy = live_server(manifest_toml(1), legacy=True)
    code, out, _ = jobs(legacy.url, "status")
    assert code == 0 and "legacy mode (serve --trust-host-header)" in out
    assert "legacy" not in jobs(live_server(manifest_toml(1)).url, "status")[1]
