"""The fast paths behind bench/run.py's figures, each pinned by a check that fails when it regresses.

No timing here: each test counts the thing that makes the path fast (index
seeks instead of scans, one send per response, one TCP connection per client
thread, several claims per commit, one parse per manifest file content).
Fast paths already pinned elsewhere are listed in bench/README.md and not
repeated: the claim seek's own plan (test_jobstore), TCP_NODELAY on accepted
sockets (test_http_api), the client's connection reuse against a stub server
(test_client), the writer-level batch (test_serve_process), zstd bundles
(test_bundle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import threading
import time

import pytest

from cis490fleet import coordinator, http_api, manifest
from cis490fleet.client import Client
from cis490fleet.jobstore import JobStore
from cis490fleet.model import JobSpec
from conftest import OPERATOR_TOKEN, Conn, alias, manifest_toml, wait_for

T0 = 1_700_000_000.0
CPU = {"os": "linux", "cores": 4, "ram_gib": 16.0, "cuda": False, "gpus": [], "slots": 4}


# -- the queue: every statement of the hot commands seeks, none scans or sorts ------------------------------


def _plans(store: JobStore, action) -> list[tuple[str, str]]:
    """(statement, its query plan) for every SELECT/UPDATE/DELETE that ``action`` ran on this thread's connection."""
    conn = store._conn()
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        action()
    finally:
        conn.set_trace_callback(None)
    out = []
    for sql in seen:
        if sql.lstrip().split(None, 1)[0].upper() not in ("SELECT", "UPDATE", "DELETE"):
            continue
        plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
        out.append((sql, plan))
    return out


def _assert_seeks(plans: list[tuple[str, str]], *, may_sort: bool = False) -> None:
    assert plans, "nothing was traced"
    for sql, plan in plans:
        steps = [step.strip() for step in plan.split("|")]
        scans = [s for s in steps if s.startswith("SCAN") and ("jobs" in s or "attempts" in s)]
        assert not scans, f"{sql}\n  scans a table: {plan}"
        sorts = [s for s in steps if "TEMP B-TREE" in s]
        assert may_sort or not sorts, f"{sql}\n  sorts: {plan}"


@pytest.fixture
def busy_store(tmp_path):
    """A queue of 2,000 jobs in two classes, a dependency chain, and a worker holding one job."""
    store = JobStore(tmp_path / "queue.sqlite3", synchronous="OFF")
    jobs = [JobSpec(model="mlp", mode="train", seed=i).to_json() for i in range(1000)]
    jobs += [JobSpec(model="big", mode="train", seed=i, require_cuda=True, priority=5).to_json() for i in range(1000)]
    jobs += [JobSpec(model="dep", mode="train", name="first", priority=9).to_json(),
             JobSpec(model="dep", mode="train", seed=1, name="second", after=("first",), priority=9).to_json()]
    store.execute({"op": "sync_manifest", "now": T0, "manifest": {"jobs": jobs}})
    yield store
    store.close()


def test_every_statement_of_claim_heartbeat_upload_and_complete_seeks(busy_store):
    store = busy_store
    got: dict = {}

    def claim():
        got.update(store.execute({"op": "claim", "now": T0 + 1, "host": "ws1", "capability": CPU, "lease": "L1"}))

    _assert_seeks(_plans(store, claim))
    assert got["job"]["name"] == "first"  # the dependency, by priority, so completing it unblocks "second"
    job_id = got["job_id"]
    sha = "ab" * 32
    _assert_seeks(_plans(store, lambda: store.execute(
        {"op": "heartbeat", "now": T0 + 2, "job_id": job_id, "host": "ws1", "lease": "L1", "progress": {"e": 1}})))
    _assert_seeks(_plans(store, lambda: store.execute(
        {"op": "record_artifact", "now": T0 + 3, "artifact_id": sha, "job_id": job_id, "host": "ws1", "lease": "L1",
         "model": "dep", "mode": "train", "size": 10, "path": "models/x"})))
    _assert_seeks(_plans(store, lambda: store.execute(
        {"op": "complete", "now": T0 + 4, "job_id": job_id, "host": "ws1", "lease": "L1", "artifact_id": sha})))
    nxt = store.execute({"op": "claim", "now": T0 + 5, "host": "ws1", "capability": CPU, "lease": "L2"})
    assert nxt["job"]["name"] == "second"


def test_the_stale_sweep_and_the_status_listing_seek(busy_store):
    store = busy_store
    for i in range(3):
        store.execute({"op": "claim", "now": T0, "host": f"ws{i}", "capability": CPU, "lease": f"L{i}"})
    # The sweep seeks the held jobs (a few per worker) and may sort those; it never walks the queue.
    _assert_seeks(_plans(store, lambda: store.execute({"op": "sweep_stale", "now": T0 + 10})), may_sort=True)
    listing = _plans(store, lambda: store.jobs(status="claimed", limit=100))
    _assert_seeks([(sql, plan) for sql, plan in listing if "count(*)" not in sql])
    assert any("jobs_status" in plan for _, plan in listing)


# -- the wire: one send per response, one connection per client thread ----------------------------------


class _CountingSocket(socket.socket):
    """An accepted socket that counts the calls that put bytes on the wire."""

    sends = 0

    def send(self, *args, **kw):
        type(self).sends += 1
        return super().send(*args, **kw)

    def sendall(self, *args, **kw):
        type(self).sends += 1
        return super().sendall(*args, **kw)


class _CountingServer(http_api.FleetHTTPServer):
    def get_request(self):
        sock, addr = super().get_request()
        timeout = sock.gettimeout()
        counted = _CountingSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        counted.settimeout(timeout)
        return counted, addr


def test_each_response_leaves_in_one_send(live_server):
    srv = live_server(manifest_toml(5))
    counting = _CountingServer(("127.0.0.1", 0), srv.coordinator)
    threading.Thread(target=counting.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{counting.port}"
        alias(url, srv)
        ws = {"x-lab-host": "ws1"}
        _CountingSocket.sends = 0
        with Conn(url) as conn:
            results = [conn.call("GET", "/v1/health"),
                       conn.call("POST", "/v1/job/claim", {"capability": CPU}, ws),
                       conn.call("GET", "/v1/jobs?status=pending"),
                       conn.call("GET", "/v1/workers"),
                       conn.call("GET", "/v1/job/" + "e" * 64),  # 404
                       conn.call("POST", "/v1/job/claim", b"{", ws)]  # 400
        assert [r[0] for r in results] == [200, 200, 200, 200, 404, 400]
        assert _CountingSocket.sends == len(results)
    finally:
        counting.shutdown()
        counting.server_close()


def test_our_client_talks_to_our_server_over_one_connection(live_server, tmp_path):
    srv = live_server(manifest_toml(40))
    accepted = []
    srv.server.accept_hook = accepted.append
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(b"weights" * 100)
    with Client(srv.url, host_id="ws1", operator_token=OPERATOR_TOKEN, retries=0) as client:
        for i in range(20):
            got = client.claim(CPU)
            client.heartbeat(got["job_id"], got["lease"], progress={"epoch": i})
            if i % 5 == 0:
                done = client.upload(got["job_id"], got["lease"], bundle)
                client.complete(got["job_id"], got["lease"], done["artifact_id"])
            else:
                client.release(got["job_id"], got["lease"])
            client.jobs(status="pending", limit=5)
            client.health()
        assert client.connections_opened == 1
    assert len(accepted) == 1


# -- group commit ----------------------------------------------------------------------------------------


class _Gate:
    """Stands in front of the real store so the test decides when the writer's first commit may finish."""

    def __init__(self, store):
        self.store = store
        self.open = threading.Event()
        self.batch_sizes: list[int] = []

    def execute_batch(self, cmds):
        self.batch_sizes.append(len(cmds))
        assert self.open.wait(30)
        return self.store.execute_batch(cmds)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_claims_over_http_that_arrive_together_share_one_commit(live_server):
    srv = live_server(manifest_toml(40))
    coord = srv.coordinator
    for i in range(16):
        srv.host_key(f"ws{i}")  # keys first: giving one is a command, and the gate counts commands
    gate = _Gate(coord.writer.store)
    coord.writer.store = gate
    before = coord.counters.snapshot()["counters"]
    results: dict[int, dict] = {}

    def claim(i: int) -> None:
        with Conn(srv.url) as conn:
            results[i] = conn.call("POST", "/v1/job/claim", {"capability": CPU}, {"x-lab-host": f"ws{i}"})

    first = threading.Thread(target=claim, args=(0,))
    first.start()
    wait_for("the first claim to reach the writer", lambda: gate.batch_sizes == [1], timeout=30, every=0.01)
    rest = [threading.Thread(target=claim, args=(i,)) for i in range(1, 16)]
    for t in rest:
        t.start()
    wait_for("the other claims to queue behind the commit", lambda: coord.writer._queue.qsize() == 15, timeout=30, every=0.01)
    gate.open.set()
    for t in [first] + rest:
        t.join(30)
    assert gate.batch_sizes == [1, 15]
    assert all(r[0] == 200 for r in results.values())
    assert len({r[2]["job_id"] for r in results.values()}) == 16
    after = coord.counters.snapshot()["counters"]
    assert after["commands"] - before["commands"] == 16 and after["batches"] - before["batches"] == 2


def test_max_batch_one_commits_every_command_alone(tmp_path):
    """The baseline of the claim benchmark (serve --max-batch 1) really is one commit per command."""
    store = JobStore(tmp_path / "queue.sqlite3", synchronous="OFF")
    store.execute({"op": "sync_manifest", "now": T0, "manifest": manifest.parse(manifest_toml(10)).to_json()})
    gate = _Gate(store)
    writer = coordinator.GroupCommitWriter(gate, max_batch=1)
    writer.start()
    try:
        futures = [writer.submit({"op": "claim", "now": T0, "host": f"ws{i}", "capability": CPU, "lease": f"L{i}"})
                   for i in range(6)]
        gate.open.set()
        assert len({f.result(30)["job_id"] for f in futures}) == 6
    finally:
        gate.open.set()
        writer.stop()
        store.close()
    assert gate.batch_sizes == [1] * 6


def test_serve_accepts_max_batch_and_refuses_zero():
    assert coordinator.build_parser().parse_args(["--max-batch", "1"]).max_batch == 1
    assert coordinator.build_parser().parse_args([]).max_batch == coordinator.MAX_BATCH
    from cis490fleet import errors

    with pytest.raises(errors.ConfigError, match="--max-batch 0"):
        coordinator.main(["--max-batch", "0", "--data", "unused"])


# -- manifest reload ---------------------------------------------------------------------------------------


def test_reloading_an_unchanged_manifest_does_not_parse_it_again(live_server, monkeypatch):
    srv = live_server(manifest_toml(30))
    parsed: list[str] = []
    real_parse = manifest.parse

    def counting_parse(text, *args, **kw):
        parsed.append(hashlib.sha256(text.encode()).hexdigest())
        return real_parse(text, *args, **kw)

    monkeypatch.setattr(manifest, "parse", counting_parse)
    op = {"x-operator-token": OPERATOR_TOKEN}
    first = srv.call("POST", "/v1/manifest/reload", None, op)[2]
    again = srv.call("POST", "/v1/manifest/reload", None, op)[2]
    assert (first["kept"], again["kept"], again["added"]) == (30, 30, 0)
    assert parsed == []  # the parse made at start-up served both reloads
    srv.manifest_path.write_text(manifest_toml(32))
    changed = srv.call("POST", "/v1/manifest/reload", None, op)[2]
    assert (changed["added"], changed["kept"]) == (2, 30)
    assert parsed == [hashlib.sha256(manifest_toml(32).encode()).hexdigest()]


def test_jobspec_to_json_carries_every_field_like_asdict():
    """to_json is written field by field for speed; a field added to JobSpec must show up in it."""
    spec = JobSpec(model="m", mode="x", hyper={"a": [1, {"b": (2, 3)}], "lr": 0.1}, split_recipe="s",
                   train_hosts=("h1",), seed=3, require_cuda=True, prefer_cuda=True, min_vram_gib=4.0,
                   min_ram_gib=2.0, allowed_hosts=("h1",), priority=2, retries=1, name="n", after=("z",),
                   gpus=2, gpu_share=True, mixed_gpus=True, expected_minutes=90.0, sweep="lr", max_runtime_s=60.0,
                   stall_after_s=30.0, stop={"metric": "val_loss"})
    expected = dataclasses.asdict(spec)
    for key in ("train_hosts", "allowed_hosts", "after"):
        expected[key] = list(expected[key])
    got = spec.to_json()
    assert got == expected and list(got) == [f.name for f in dataclasses.fields(JobSpec)]
    assert got["hyper"]["a"] is not spec.hyper["a"]  # a copy: callers may change it
    assert JobSpec.from_json(got) == spec
    plain = JobSpec(model="m", mode="x")
    assert JobSpec.from_json(plain.to_json()) == plain


# -- upload ------------------------------------------------------------------------------------------------


def test_upload_with_the_bundles_known_sha_is_still_verified_by_the_server(live_server, tmp_path):
    """A worker passes the sha256 make_bundle computed, so the client reads the bundle once, while sending it."""
    from cis490fleet import errors

    srv = live_server(manifest_toml(2))
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(b"trained weights " * 4096)
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    with Client(srv.url, host_id="ws1", retries=0) as client:
        got = client.claim(CPU)
        with pytest.raises(errors.IntegrityError, match="x-content-sha256"):
            client.upload(got["job_id"], got["lease"], bundle, sha256="0" * 64)
        assert client.upload(got["job_id"], got["lease"], bundle, sha256=sha)["artifact_id"] == sha
        with pytest.raises(errors.BadRequest, match="sha256"):
            client.upload(got["job_id"], got["lease"], bundle, sha256="not-a-sha")


# -- the claim's capability cache ------------------------------------------------------------------------


def test_claim_capability_cache_answers_as_if_every_claim_normalised_afresh(tmp_path):
    """The store caches a claim's normalised and effective capability; 4 and 4.0 still normalise apart,
    and a new manifest's [[hosts]] override applies to the very next claim with the same capability."""
    from cis490fleet.model import FleetConfig, HostSpec, Manifest

    def sync(hosts):
        m = Manifest(fleet=FleetConfig(), hosts=tuple(hosts),
                     jobs=tuple(JobSpec(model="mlp", mode="train", seed=i) for i in range(6))).to_json()
        store.execute({"op": "sync_manifest", "now": 1.0, "manifest": m})

    def claim(cap, lease):
        return store.execute({"op": "claim", "now": 2.0, "host": "ws1", "capability": cap, "lease": lease})

    def stored_cores():
        return [w["capability"]["cores"] for w in store.workers(2.0) if w["host"] == "ws1"]

    with JobStore(tmp_path / "queue.sqlite3") as store:
        sync([])
        cap = {"cores": 4, "ram_gib": 16.0, "slots": 3}
        assert claim(dict(cap), "L1")["job"] is not None and stored_cores() == [4]
        assert claim(dict(cap, cores=4.0), "L2")["job"] is not None and stored_cores() == [1]  # not an int
        assert claim(dict(cap), "L3")["job"] is not None
        assert claim(dict(cap), "L3b") == {"job": None}  # three held in its three slots
        sync([HostSpec(id="ws1", slots=5)])
        assert claim(dict(cap), "L4")["job"] is not None  # the override counts at once
        sync([HostSpec(id="ws1", slots=4)])
        assert claim(dict(cap), "L5") == {"job": None}


def test_date_header_is_the_current_second_though_formatted_once_a_second(live_server):
    import email.utils

    srv = live_server(manifest_toml(1))
    with Conn(srv.url) as conn:
        for _ in range(3):
            before = int(time.time())
            status, headers, _ = conn.call("GET", "/v1/health")
            after = int(time.time())
            assert status == 200
            sent = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
            assert before <= sent <= after and headers["date"].endswith(" GMT")
            time.sleep(0.6)


def test_claim_in_fewer_statements_still_clears_progress_and_returns_the_spec(tmp_path):
    """The claim loads the spec with the job's state and clears progress in the state's UPDATE."""
    from cis490fleet.model import FleetConfig, Manifest

    spec = JobSpec(model="mlp", mode="train", seed=7, hyper={"lr": 0.1})
    m = Manifest(fleet=FleetConfig(), jobs=(spec,)).to_json()
    with JobStore(tmp_path / "queue.sqlite3") as store:
        store.execute({"op": "sync_manifest", "now": 1.0, "manifest": m})
        first = store.execute({"op": "claim", "now": 2.0, "host": "ws1", "capability": CPU, "lease": "L1"})
        assert first["job"] == {**spec.to_json(), "id": spec.id}
        store.execute({"op": "heartbeat", "now": 3.0, "job_id": spec.id, "host": "ws1", "lease": "L1",
                       "progress": {"epoch": 3}, "log_tail": None})
        assert store.job(spec.id, 3.0)["progress"] == {"epoch": 3}
        store.execute({"op": "release", "now": 4.0, "job_id": spec.id, "host": "ws1", "lease": "L1"})
        again = store.execute({"op": "claim", "now": 5.0, "host": "ws2", "capability": CPU, "lease": "L2"})
        assert again["job_id"] == spec.id and again["job"] == first["job"]
        assert store.job(spec.id, 5.0)["progress"] is None


# -- CLI start-up ------------------------------------------------------------------------------------------


def _modules_after(code: str) -> set[str]:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    probe = f"import sys; sys.path.insert(0, {str(root)!r}); {code}; import json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_manifest_check_imports_neither_logging_nor_subprocess():
    """The zipapp compiles every module it imports; `manifest check` needs no logging, no subprocess
    (only --describe runs a command) and no difflib (only a mistake gets a suggestion)."""
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "etc" / "training_manifest.toml.example"
    loaded = _modules_after(f"from cis490fleet import cli; assert cli.main(['manifest', 'check', {str(example)!r}]) == 0")
    assert {"cis490fleet.manifest", "tomllib"} <= loaded
    assert not loaded & {"logging", "subprocess", "difflib"}


def test_jobs_cli_does_not_import_subprocess():
    loaded = _modules_after("import cis490fleet.ops")
    assert {"cis490fleet.client", "http.client"} <= loaded
    assert "subprocess" not in loaded


def test_cached_refusal_verdicts_keep_allowed_hosts_apart(tmp_path):
    """The claim caches each class's static verdict per capability; the same capability from a host that a
    class allows and from one it does not must still get different answers, in either order."""
    from cis490fleet.model import FleetConfig, Manifest

    pinned = [JobSpec(model="pinned", mode="train", seed=i, allowed_hosts=("ws1",), priority=10) for i in range(2)]
    plain = [JobSpec(model="plain", mode="train", seed=i) for i in range(4)]
    m = Manifest(fleet=FleetConfig(), jobs=tuple(pinned + plain)).to_json()
    cap = dict(CPU, slots=10)
    with JobStore(tmp_path / "queue.sqlite3") as store:
        store.execute({"op": "sync_manifest", "now": 1.0, "manifest": m})

        def model_claimed_by(host, lease):
            got = store.execute({"op": "claim", "now": 2.0, "host": host, "capability": dict(cap), "lease": lease})
            return got["job"]["model"]

        assert [model_claimed_by("ws2", "L1"), model_claimed_by("ws1", "L2"),
                model_claimed_by("ws2", "L3"), model_claimed_by("ws1", "L4")] == ["plain", "pinned", "plain", "pinned"]


def test_requests_that_find_the_host_keys_unread_read_them_once_between_them(tmp_path, monkeypatch):
    """After a start or a key change, the first signed requests of many connections arrive together: one
    reads the keys and the others wait for that read, instead of each reading the whole table in turn."""
    coord = coordinator.Coordinator(tmp_path / "data", node_id="n")
    try:
        for n in range(3):
            coord.execute({"op": "host_key_set", "host": f"h{n}", "key": f"{n:064x}", "by": "op", "rotate": False})
        reads: list[int] = []
        real = coord.store.host_keys

        def slow_read():
            reads.append(1)
            time.sleep(0.3)  # long enough for every thread below to find the cache empty meanwhile
            return real()

        monkeypatch.setattr(coord.store, "host_keys", slow_read)
        coord.forget_known_hosts()
        got: list[bytes | None] = []
        threads = [threading.Thread(target=lambda: got.append(coord.host_key("h2"))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert got == [bytes.fromhex(f"{2:064x}")] * 8
        assert len(reads) == 1, f"{len(reads)} threads read the host keys"
        coord.execute({"op": "host_key_revoke", "host": "h2", "by": "op"})
        assert coord.host_key("h2") is None and len(reads) == 2  # a key command still drops what was read
    finally:
        coord.close(grace=5)
