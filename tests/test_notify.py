"""[[notify]] webhooks: what they say, how they are signed, and that a dead receiver never holds up the queue.

Deliveries go to a real HTTP receiver on loopback; the queue is driven through the coordinator's own
commands (claim, upload, complete, fail, the stale sweep) so that the notifier sees what a fleet does.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import time

import pytest

from cis490fleet import manifest, notify
from cis490fleet.errors import ManifestError
from cis490fleet.model import NotifyTarget

from conftest import closed_port_url, wait_for

SECRET = "notify-secret-for-tests"


class Receiver:
    """A webhook receiver on 127.0.0.1 that records each POST; ``fail_first`` answers 500 that many times."""

    def __init__(self, fail_first: int = 0):
        self.posts: list[dict] = []
        self.refused = 0
        self.fail_first = fail_first
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                if outer.refused < outer.fail_first:
                    outer.refused += 1
                    self.send_response(500)
                else:
                    outer.posts.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                        "json": json.loads(body)})
                    self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [p["json"].get("event") for p in self.posts]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(fail_first: int = 0) -> Receiver:
        r = Receiver(fail_first)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def fleet_manifest(url: str, *, on: str = '["failed", "completed", "sweep_done", "host_lost"]', fmt: str = "json",
                   extra: str = "") -> str:
    return f"""
[fleet]
heartbeat_s = 1
stale_after_s = 3
max_attempts = 1

[[hosts]]
id = "ws-a"
slots = 2

[[sweeps]]
name = "lr"
model = "mlp"
mode = "sweep"
seed = [1, 2]

[[notify]]
url = "{url}"
on = {on}
format = "{fmt}"
secret_env = "CIS490_TEST_NOTIFY_SECRET"
{extra}"""


def claim(coord) -> dict:
    got = coord.claim("ws-a", {"cores": 2, "ram_gib": 4})
    assert got["job"] is not None, got
    return got


def complete(coord, got: dict) -> None:
    data = b"a trained model"
    coord.store_artifact(got["job_id"], "ws-a", got["lease"], io.BytesIO(data), hashlib.sha256(data).hexdigest(),
                         len(data))
    coord.execute({"op": "complete", "job_id": got["job_id"], "host": "ws-a", "lease": got["lease"],
                   "artifact_id": hashlib.sha256(data).hexdigest()})


def fail(coord, got: dict, error: str = "trainer exit code 1: loss is NaN") -> None:
    coord.execute({"op": "fail", "job_id": got["job_id"], "host": "ws-a", "lease": got["lease"], "error": error})


# -- pure parts ---------------------------------------------------------------------------------------


def test_a_signature_verifies_only_for_the_same_secret_body_and_a_recent_timestamp():
    body = b'{"event":"failed"}'
    sig = notify.sign(SECRET, 1_000, body)
    assert notify.verify(SECRET, 1_000, body, sig, now=1_010)
    assert not notify.verify("another secret", 1_000, body, sig, now=1_010)
    assert not notify.verify(SECRET, 1_000, body + b" ", sig, now=1_010)
    assert not notify.verify(SECRET, 1_001, body, sig, now=1_010)
    assert not notify.verify(SECRET, 1_000, body, sig, now=1_000 + 3_600)  # a replay an hour later


def test_a_sweep_is_done_only_when_every_job_is_final():
    assert notify.sweep_done("lr", {"completed": 3, "pending": 1}) is None
    assert notify.sweep_done("lr", {}) is None
    event = notify.sweep_done("lr", {"completed": 3, "failed": 1, "cancelled": 0})
    assert event.data == {"sweep": "lr", "jobs": 4, "counts": {"completed": 3, "failed": 1}}


def test_backoff_doubles_up_to_five_minutes():
    assert [notify.backoff_s(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert notify.backoff_s(30) == notify.MAX_BACKOFF_S


def test_the_slack_format_is_one_line_of_text():
    event = notify.job_event("failed", {"id": "ab" * 32, "name": "lr-0", "model": "mlp", "mode": "sweep",
                                        "last_error": "trainer exit code 1: loss is NaN\nmore"})
    body = json.loads(notify.body(NotifyTarget(url="http://x/", format="slack"), event, "lab", 5.0))
    assert body == {"text": "[lab] job lr-0 (mlp/sweep) failed: trainer exit code 1: loss is NaN"}


# -- the manifest ---------------------------------------------------------------------------------------


def test_notify_tables_are_checked_with_every_problem_named():
    text = fleet_manifest("ftp://example", on='["faild"]', fmt="xml").replace('"CIS490_TEST_NOTIFY_SECRET"', '"1x"')
    with pytest.raises(ManifestError) as err:
        manifest.parse(text, "m.toml")
    problems = "\n".join(err.value.problems)
    assert "notify[0] (url=ftp://example).url: expected an http:// or https:// URL" in problems
    assert "on[0]: unknown event \"faild\"; did you mean 'failed'?" in problems
    assert "format: unknown format \"xml\"; expected one of: json, slack" in problems
    assert "secret_env: \"1x\" is not allowed here" in problems


def test_sweep_jobs_know_their_sweep_and_notify_targets_survive_the_round_trip():
    m = manifest.parse(fleet_manifest("http://127.0.0.1:1/hook") + '\n[[sweeps]]\nmodel = "mlp"\nmode = "x"\n'
                                                                   'seed = [1, 2]\n', "m.toml")
    assert [j.sweep for j in m.jobs] == ["lr", "lr", "sweeps[1]", "sweeps[1]"]
    assert m.fleet.notify == (NotifyTarget(url="http://127.0.0.1:1/hook",
                                           on=("failed", "completed", "sweep_done", "host_lost"),
                                           secret_env="CIS490_TEST_NOTIFY_SECRET"),)
    assert type(m).from_json(m.to_json()) == m


# -- deliveries from a running coordinator --------------------------------------------------------------


def test_completed_failed_and_sweep_done_reach_the_receiver_signed(live_server, receiver, monkeypatch):
    monkeypatch.setenv("CIS490_TEST_NOTIFY_SECRET", SECRET)
    hook = receiver()
    coord = live_server(fleet_manifest(hook.url)).coordinator
    first, second = claim(coord), claim(coord)
    complete(coord, first)
    fail(coord, second)
    wait_for("three notifications", lambda: len(hook.posts) >= 3, timeout=30)
    time.sleep(0.3)
    assert sorted(hook.events()) == ["completed", "failed", "sweep_done"]
    by_event = {p["json"]["event"]: p for p in hook.posts}
    assert by_event["completed"]["json"]["job_id"] == first["job_id"]
    assert by_event["failed"]["json"]["job_id"] == second["job_id"]
    assert "loss is NaN" in by_event["failed"]["json"]["error"]
    assert by_event["sweep_done"]["json"]["counts"] == {"completed": 1, "failed": 1}
    for post in hook.posts:
        h = post["headers"]
        assert h[notify.EVENT_HEADER] == post["json"]["event"]
        assert notify.verify(SECRET, int(h[notify.TIMESTAMP_HEADER]), post["body"], h[notify.SIGNATURE_HEADER],
                             now=time.time())


def test_a_receiver_that_fails_is_retried_with_backoff_until_it_answers(live_server, receiver):
    hook = receiver(fail_first=2)
    coord = live_server(fleet_manifest(hook.url, on='["completed"]')).coordinator
    complete(coord, claim(coord))
    wait_for("the notification after two refusals", lambda: hook.posts, timeout=30)
    assert hook.refused == 2
    assert hook.events() == ["completed"]
    assert coord.notifier.counters["retried"] == 2
    assert notify.SIGNATURE_HEADER not in hook.posts[0]["headers"]  # the secret's variable is not set


def test_host_lost_names_the_host_and_the_jobs_the_stale_sweep_took_back(live_server, receiver):
    hook = receiver()
    coord = live_server(fleet_manifest(hook.url, on='["host_lost"]', fmt="json",
                                       extra="").replace("max_attempts = 1", "max_attempts = 3")).coordinator
    got = claim(coord)
    result = coord.execute({"op": "sweep_stale", "now": time.time() + 60})
    assert result["recovered"] == 1
    wait_for("host_lost", lambda: hook.posts, timeout=30)
    body = hook.posts[0]["json"]
    assert (body["event"], body["host"], body["jobs"]) == ("host_lost", "ws-a", [got["job_id"]])


def test_a_dead_receiver_never_holds_up_the_queue(live_server):
    coord = live_server(fleet_manifest(closed_port_url() + "/hook")).coordinator
    t0 = time.monotonic()
    first, second = claim(coord), claim(coord)
    complete(coord, first)
    fail(coord, second)
    assert time.monotonic() - t0 < 5
    wait_for("a failed delivery to be retried", lambda: coord.notifier.counters["retried"] >= 1, timeout=30)
    assert coord.store.counts()["completed"] == 1


def test_only_wanted_events_are_sent_in_the_slack_format(live_server, receiver):
    hook = receiver()
    coord = live_server(fleet_manifest(hook.url, on='["failed"]', fmt="slack")).coordinator
    first, second = claim(coord), claim(coord)
    complete(coord, first)
    fail(coord, second, error="trainer exit code 2: unknown hyper key 'lrr'")
    wait_for("the failure", lambda: hook.posts, timeout=30)
    time.sleep(1.0)
    assert [p["json"] for p in hook.posts] == [
        {"text": f"[fleet] job lr-1 (mlp/sweep) failed: trainer exit code 2: unknown hyper key 'lrr'"}]
