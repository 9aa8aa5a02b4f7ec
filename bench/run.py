#!/usr/bin/env python3
"""Benchmarks of the coordinator, worker and CLI, each against a baseline measured in the same run.

    python3 bench/run.py [--quick] [--only NAME]... [--out bench/results.json]

Prints one line per figure, ``name: value unit (ratio R vs BASELINE)``, followed by
the goal it is held to, and writes every figure (with the samples behind it) to
``bench/results.json``. Baselines run interleaved with ours in the same run, so
the ratios hold on a noisy machine where server and load share the cores. Load
runs in separate processes; all traffic goes to 127.0.0.1; every loop is bounded
in count and time. See bench/README.md for what limits each figure.

Names: claim, cycle, scale, dispatch, upload, bundle, manifest, cli, idle, failover (bench/failover.py),
placement (bench/placement.py: a simulated lab through the real placement policy).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
from cis490fleet import signing  # noqa: E402

TOKEN = "bench-operator-token-0123456789"
MiB = 1 << 20
CPU = loadgen.CPU


# -- small helpers ----------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_hwm(pid: int) -> None:
    """Start a fresh peak-RSS window (VmHWM) for ``pid``."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call(url: str, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 120,
         context=None) -> tuple[int, object]:
    host_port = url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    conn = (http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context) if url.startswith("https")
            else http.client.HTTPConnection(host, int(port), timeout=timeout))
    try:
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.headers.get("content-type", "").startswith("application/json") and data:
            return resp.status, json.loads(data)
        return resp.status, data
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.3g}"


# -- processes under test ----------------------------------------------------------------------------


class Server:
    """A server subprocess that writes its URL to a port file; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, argv: list[str], workdir: Path, env: dict | None = None, context=None):
        self.argv = argv
        self.workdir = workdir
        self.port_file = workdir / "url"
        self.log_path = workdir / "server.log"
        self.env = env
        self.context = context
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def __enter__(self) -> "Server":
        self.port_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not self.port_file.exists() or not self.port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv[2:4]} did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.02)
        self.url = self.port_file.read_text().strip()
        while True:
            try:
                if call(self.url, "GET", "/v1/health", timeout=10, context=self.context)[0] == 200:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /v1/health:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def server_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIS490_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["CIS490_OPERATOR_TOKEN"] = TOKEN
    env["CIS490_LOG_LEVEL"] = "WARNING"  # no access log line per request, as for the baseline
    return env


def serve(workdir: Path, *args: str, manifest: Path | None = None, context=None, signed: bool = False) -> Server:
    """A coordinator for a benchmark. The load generators send unsigned requests (``x-lab-host`` only), so it runs
    in the legacy mode unless ``signed`` (the signed claim bench, whose hosts have keys in its queue)."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "cis490fleet", "serve", "--data", str(workdir / "data"), "--bind", "127.0.0.1:0",
            "--port-file", str(workdir / "url"), "--synchronous", "FULL", *([] if signed else ["--trust-host-header"]),
            *args]
    if manifest is not None:
        argv += ["--manifest", str(manifest)]
    return Server(argv, workdir, server_env(), context)


def starlette(workdir: Path, db: Path) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(HERE / "baseline_starlette.py"), "--db", str(db), "--port-file", str(workdir / "url")]
    return Server(argv, workdir, server_env())


# -- queues built directly ----------------------------------------------------------------------------


def python3() -> str:
    """The plain interpreter behind this (virtual environment's) python: what an operator's python3 is."""
    base = getattr(sys, "_base_executable", None)
    return base if base and os.path.exists(base) else sys.executable


def fsync_latency(folder: Path, n: int = 50) -> float:
    """Median seconds of one 4 KiB append + fsync in ``folder``: the floor under every durable commit."""
    path = folder / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times)


def jobs_json(n: int, model: str = "mlp", **extra) -> list[dict]:
    return [{"model": model, "mode": "train", "seed": i, **extra} for i in range(n)]


def build_queue(path: Path, jobs: list[dict], fleet: dict | None = None, hosts: list | None = None) -> Path:
    """A queue file holding ``jobs`` (Manifest.to_json() job dicts), synced the way serve syncs a manifest."""
    from cis490fleet.jobstore import JobStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with JobStore(path, synchronous="OFF") as store:
        store.execute({"op": "sync_manifest", "now": time.time(),
                       "manifest": {"fleet": fleet or {}, "trainer": {}, "hosts": hosts or [], "jobs": jobs}})
    return path


def add_claim_host_keys(path: Path, connections: int = 16, hosts: int = 1024) -> None:
    """Keys for every host the claim load signs as (``loadgen.bench_host_key``), as `jobs hosts add` stores them."""
    import sqlite3

    conn = sqlite3.connect(path)
    with conn:
        conn.executemany("INSERT INTO host_keys (host, key, created, created_by) VALUES (?, ?, ?, 'bench')",
                         ((f"c{i}-{h}", loadgen.bench_host_key(f"c{i}-{h}").hex(), time.time())
                          for i in range(connections) for h in range(hosts)))
    conn.close()


# Constraint classes a CPU host named c<i>-<j> can never take; they outrank the eligible class.
INELIGIBLE = ({"model": "big", "mode": "train", "require_cuda": True, "priority": 10},
              {"model": "pinned", "mode": "train", "allowed_hosts": ["gpu1"], "priority": 10},
              {"model": "huge", "mode": "train", "min_ram_gib": 512.0, "priority": 10})


def build_scale_queue(path: Path, total: int, eligible_every: int = 100) -> Path:
    """``total`` pending jobs, one in ``eligible_every`` claimable by a CPU host, bulk-inserted by class."""
    from cis490fleet import db
    from cis490fleet.jobstore import JobStore

    reps = [{"model": "mlp", "mode": "train", "seed": -1}] + [dict(c, seed=-1) for c in INELIGIBLE]
    build_queue(path, reps)
    with JobStore(path, synchronous="OFF") as store:
        conn = store._conn()
        classes = [conn.execute("SELECT cls FROM jobs WHERE model = ?", (r["model"],)).fetchone()[0] for r in reps]
        now = time.time()

        def rows():
            for i in range(total):
                k = 0 if i % eligible_every == 0 else 1 + i % len(INELIGIBLE)
                rep = reps[k]
                spec = json.dumps(dict(rep, seed=i), sort_keys=True, separators=(",", ":"))
                job_id = f"{i:064x}"
                yield (job_id, i + 10, classes[k], rep["model"], "train", rep.get("priority", 0), spec, job_id,
                       "pending", now, now)

        with db.transaction(conn):
            conn.executemany("INSERT INTO jobs (id, seq, cls, model, mode, priority, spec, spec_hash, status, "
                             "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("ANALYZE")
    return path


def fresh_data(workdir: Path, template: Path) -> Path:
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, data / "queue.sqlite3")
    return workdir


def manifest_text(n: int) -> str:
    """``n`` [[jobs]] tables, the way a long hand-kept or generated manifest looks."""
    out = ["[fleet]", "heartbeat_s = 30", "stale_after_s = 600", ""]
    for i in range(n):
        out += ["[[jobs]]", f'model = "m{i % 20}"', f'mode = "{("train", "eval")[i % 2]}"', f"seed = {i}",
                f'split_recipe = "fold{i % 5}"', f"hyper = {{ lr = {0.001 * (1 + i % 7):.4f}, hidden = [64, {32 * (1 + i % 4)}] }}",
                f"priority = {i % 3}", ""]
    return "\n".join(out)


# -- the benchmarks ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, quick: bool, work: Path):
        self.quick = quick
        self.work = work
        self.figures: dict[str, dict] = {}
        self._templates: dict[str, Path] = {}

    def report(self, name: str, value: float, unit: str, ratio: float | None, baseline: str, goal: str, ok: bool,
               **details) -> None:
        ratio_text = f"ratio {fmt(ratio)} vs {baseline}" if ratio is not None else f"vs {baseline}"
        line = f"{name}: {fmt(value)} {unit} ({ratio_text})  [goal {goal}: {'met' if ok else 'MISSED'}]"
        print(line, flush=True)
        self.figures[name] = {"value": value, "unit": unit, "ratio": ratio, "baseline": baseline, "goal": goal,
                              "met": ok, "line": line, **details}

    def dir(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=name + "-", dir=self.work))
        return path

    def claim_template(self) -> Path:
        if "claim" not in self._templates:
            path = build_queue(self.work / "templates" / "claim.sqlite3", jobs_json(100_000))
            add_claim_host_keys(path)
            self._templates["claim"] = path
        return self._templates["claim"]

    # -- durable claim throughput -----------------------------------------------------------------

    def claim(self) -> None:
        template = self.claim_template()
        duration, rounds = (3.0, 1) if self.quick else (8.0, 3)
        rates: dict[str, list[float]] = {"ours": [], "batch1": [], "starlette": [], "signed": []}
        order = list(rates)
        for r in range(rounds):
            for name in order[r % 4:] + order[:r % 4]:
                work = fresh_data(self.dir(f"claim-{name}"), template)
                if name == "starlette":
                    server = starlette(work, work / "data" / "queue.sqlite3")
                else:
                    server = serve(work, *(["--max-batch", "1"] if name == "batch1" else []), signed=name == "signed")
                with server:
                    if name == "signed":
                        # The queue file existed before this start, so serve refuses session-less writes signed
                        # before its start + HOST_AHEAD_S as possible replays (``Trust.forget_before``).
                        time.sleep(signing.HOST_AHEAD_S + 1.5)
                    res = loadgen.run(server.port, "claim", connections=16, processes=2, duration=duration,
                                      warmup=1.0, kwargs={"signed": name == "signed"})
                rates[name].append(res["rate"])
        fsync_s = fsync_latency(self.work)
        print(f"fsync_floor: {fsync_s * 1000:.2f} ms per 4 KiB append+fsync here; at one commit per batch, 16 "
              f"clients cannot exceed {16 / fsync_s:.0f} claims/s, nor one fsync per claim {1 / fsync_s:.0f}/s",
              flush=True)
        ours = statistics.median(rates["ours"])
        vs_batch1 = statistics.median(o / b for o, b in zip(rates["ours"], rates["batch1"]))
        vs_starlette = statistics.median(o / s for o, s in zip(rates["ours"], rates["starlette"]))
        self.report("claim", ours, "claims/s", vs_batch1,
                    f"one fsync per request (--max-batch 1: {fmt(statistics.median(rates['batch1']))} claims/s)",
                    ">= 3000 claims/s and ratio >= 2", ours >= 3000 and vs_batch1 >= 2, samples=rates,
                    fsync_ms=fsync_s * 1000)
        signed = statistics.median(rates["signed"])
        vs_unsigned = statistics.median(s / o for s, o in zip(rates["signed"], rates["ours"]))
        self.report("claim_signed", signed, "claims/s", vs_unsigned,
                    f"the same claims unsigned (--trust-host-header: {fmt(ours)} claims/s), side by side",
                    "ratio >= 0.9", vs_unsigned >= 0.9, samples=rates)
        self.report("claim_vs_starlette", ours, "claims/s", vs_starlette,
                    f"uvicorn[standard]+Starlette, one fsync per request "
                    f"({fmt(statistics.median(rates['starlette']))} claims/s)", "ratio >= 1.0", vs_starlette >= 1.0,
                    samples=rates)

    # -- full worker cycle ---------------------------------------------------------------------------

    def cycle(self) -> None:
        template = self.claim_template()
        duration, rounds = (3.0, 1) if self.quick else (8.0, 2)
        rates = []
        for _ in range(rounds):
            work = fresh_data(self.dir("cycle"), template)
            with serve(work) as server:
                res = loadgen.run(server.port, "cycle", connections=16, processes=2, duration=duration, warmup=1.0)
            rates.append(res["rate"])
        rate = statistics.median(rates)
        self.report("cycle", rate, "cycles/s", rate / 800, "the goal of 800 cycles/s", ">= 800 cycles/s",
                    rate >= 800, samples=rates)

    # -- claim rate against queue size -------------------------------------------------------------

    def scale(self) -> None:
        total = 100_000 if self.quick else 1_000_000
        per_conn, rounds = (30, 2) if self.quick else (60, 3)
        big = build_scale_queue(self.work / "templates" / "scale.sqlite3", total)
        small = build_queue(self.work / "templates" / "small.sqlite3", jobs_json(1000))
        big_work = self.dir("scale-big")
        (big_work / "data").mkdir()
        os.replace(big, big_work / "data" / "queue.sqlite3")  # reused: each round claims < 1% of its eligible jobs
        rates: dict[str, list[float]] = {"big": [], "small": []}
        for r in range(rounds):
            for name in (("big", "small") if r % 2 == 0 else ("small", "big")):
                work = big_work if name == "big" else fresh_data(self.dir("scale-small"), small)
                with serve(work) as server:
                    loadgen.run(server.port, "claim", connections=16, processes=1, warmup=0, max_ops=1,
                                duration=60, kwargs={"hosts": 1})
                    res = loadgen.run(server.port, "claim", connections=16, processes=2, warmup=0, max_ops=per_conn,
                                      duration=120)
                rates[name].append(res["rate"])
        ratio = statistics.median(b / s for b, s in zip(rates["big"], rates["small"]))
        self.report("scale", statistics.median(rates["big"]), f"claims/s with {total:,} pending (99% ineligible)",
                    ratio, f"1,000 pending ({fmt(statistics.median(rates['small']))} claims/s)", "ratio >= 0.9",
                    ratio >= 0.9, samples=rates, claims_per_round=16 * per_conn)

    # -- dispatch latency ----------------------------------------------------------------------------

    def dispatch(self) -> None:
        n = 10 if self.quick else 40
        work = self.dir("dispatch")
        path = work / "manifest.toml"
        head = ["[fleet]", "heartbeat_s = 30", "", '[[hosts]]', 'id = "driver"', "", '[[hosts]]', 'id = "poller"', ""]
        pairs = []
        for i in range(n):
            pairs += ["[[jobs]]", 'model = "dep"', 'mode = "train"', f"seed = {i}", f'name = "dep-{i}"',
                      'allowed_hosts = ["driver"]', "",
                      "[[jobs]]", 'model = "next"', 'mode = "train"', f"seed = {i}", f'name = "next-{i}"',
                      'allowed_hosts = ["poller"]', f'after = ["dep-{i}"]', ""]
        fresh: list[str] = []
        path.write_text("\n".join(head + pairs))
        samples: dict[str, list[float]] = {"reload": [], "dependency": []}
        with serve(work, manifest=path) as server:
            import multiprocessing as mp

            mpx = mp.get_context("spawn")
            got, stop = mpx.Queue(), mpx.Event()
            poller = mpx.Process(target=loadgen.poller, args=(server.port, "poller", got, stop, 4 * n), daemon=True)
            poller.start()
            try:
                time.sleep(1.0)
                op = {"x-operator-token": TOKEN}
                for i in range(n):
                    fresh += ["[[jobs]]", 'model = "fresh"', 'mode = "train"', f"seed = {i}", f'name = "fresh-{i}"',
                              'allowed_hosts = ["poller"]', ""]
                    path.write_text("\n".join(head + pairs + fresh))
                    time.sleep(0.05)
                    t0 = time.monotonic()
                    status, body = call(server.url, "POST", "/v1/manifest/reload", {}, op)
                    assert status == 200, body
                    name, t1 = got.get(timeout=30)
                    assert name == f"fresh-{i}", name
                    samples["reload"].append((t1 - t0) * 1000)
                driver = {"x-lab-host": "driver"}
                for i in range(n):
                    status, claim = call(server.url, "POST", "/v1/job/claim", {"capability": CPU}, driver)
                    assert status == 200 and claim["job"]["name"] == f"dep-{i}", claim
                    bundle = os.urandom(1024)
                    sha = hashlib.sha256(bundle).hexdigest()
                    headers = dict(driver, **{"x-lease": claim["lease"]})
                    status, _ = call(server.url, "PUT", f"/v1/model/{claim['job_id']}", bundle,
                                     dict(headers, **{"x-content-sha256": sha}))
                    assert status == 201
                    time.sleep(0.05)
                    t0 = time.monotonic()
                    status, body = call(server.url, "POST", f"/v1/job/{claim['job_id']}/complete",
                                        {"artifact_id": sha}, headers)
                    assert status == 200, body
                    name, t1 = got.get(timeout=30)
                    assert name == f"next-{i}", name
                    samples["dependency"].append((t1 - t0) * 1000)
            finally:
                stop.set()
                poller.join(70)
                if poller.is_alive():
                    poller.kill()
        every = samples["reload"] + samples["dependency"]
        p50, p99 = percentile(every, 0.5), percentile(every, 0.99)
        polling = 2500.0
        self.report("dispatch_p50", p50, "ms", p50 / polling, "a worker polling every 5 s (mean 2500 ms)",
                    "p50 <= 20 ms", p50 <= 20, samples=samples,
                    by_kind={k: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)} for k, v in samples.items()})
        self.report("dispatch_p99", p99, "ms", p99 / polling, "a worker polling every 5 s (mean 2500 ms)",
                    "p99 <= 100 ms", p99 <= 100)

    # -- streamed upload ------------------------------------------------------------------------------

    def upload(self) -> None:
        size = (256 if self.quick else 2048) * MiB
        rounds = 1 if self.quick else 2
        work = self.dir("upload")
        src = work / "bundle.tar"
        sha = _write_random(src, size)
        ca_file, cert_file, key_file, client_ctx = _tls_files(work)
        manifest = work / "manifest.toml"
        manifest.write_text(f"[fleet]\nmax_artifact_bytes = {4 * size}\n\n[[sweeps]]\nmodel = \"up\"\nmode = \"train\"\n"
                            f"seed = [{', '.join(str(i) for i in range(8))}]\n")
        runs: dict[str, list[dict]] = {"plain": [], "tls": []}
        for _ in range(rounds):
            for kind in ("plain", "tls"):
                tls = kind == "tls"
                os.sync()  # every measurement starts with no dirty pages left by the one before
                ceiling = (_tls_ceiling(src, work, cert_file, key_file, ca_file) if tls
                           else _local_ceiling(src, work / "ceiling.bin"))
                args = ["--cert", str(cert_file), "--key", str(key_file)] if tls else []
                with serve(self.dir(f"upload-{kind}"), *args, manifest=manifest, context=client_ctx) as server:
                    before = proc_status(server.pid)["VmRSS"]
                    reset_hwm(server.pid)
                    os.sync()
                    out = subprocess.run([sys.executable, str(HERE / "loadgen.py"), "upload", server.url, str(src),
                                          sha]
                                         + ([str(ca_file)] if tls else []), capture_output=True, text=True,
                                         timeout=900, env=server_env())
                    if out.returncode != 0:
                        raise RuntimeError(f"upload client failed: {out.stderr[-2000:]}")
                    client = json.loads(out.stdout)
                    after = proc_status(server.pid)
                runs[kind].append({"seconds": client["seconds"], "ceiling_s": ceiling,
                                   "vs_ceiling": ceiling / client["seconds"],
                                   "server_rss_growth_mib": after["VmHWM"] - before,
                                   "client_hwm_mib": client["hwm_mib"]})
        src.unlink()
        for kind, rs in runs.items():
            seconds = statistics.median(r["seconds"] for r in rs)
            ceiling = statistics.median(r["ceiling_s"] for r in rs)
            ratio = statistics.median(r["vs_ceiling"] for r in rs)
            growth = max(r["server_rss_growth_mib"] for r in rs)
            client_hwm = max(r["client_hwm_mib"] for r in rs)
            ok = ratio >= 0.8 and growth <= 16 and client_hwm <= 64
            where = "over a raw TLS socket" if kind == "tls" else "locally"
            self.report(f"upload_{kind}", size / MiB / seconds,
                        f"MiB/s ({size // MiB} MiB; coordinator RSS +{growth:.1f} MiB, client peak RSS "
                        f"{client_hwm:.1f} MiB)", ratio, f"hash+write+fsync {where} ({fmt(size / MiB / ceiling)} MiB/s)",
                        "ratio >= 0.8, coordinator RSS growth <= 16 MiB, client RSS <= 64 MiB", ok, runs=rs)

    # -- bundle ----------------------------------------------------------------------------------------

    def bundle(self) -> None:
        from cis490fleet import bundle

        work = self.dir("bundle")
        src = work / "out"
        src.mkdir()
        total = 200 * 1000 * 1000
        for i in range(4):
            _write_weights(src / f"layer{i}.bin", total // 4, seed=i)
        (src / "metrics.json").write_text('{"acc": 0.9}\n')
        rounds = 1 if self.quick else 3
        ours, zstd_alone = [], []
        for r in range(rounds):
            t0 = time.perf_counter()
            path, _, size = bundle.make_bundle(src, work / f"bundle{r}")
            ours.append(time.perf_counter() - t0)
            path.unlink()
            t0 = time.perf_counter()
            _zstd_alone(src, work / f"plain{r}.zst")
            zstd_alone.append(time.perf_counter() - t0)
        ratio = statistics.median(z / o for z, o in zip(zstd_alone, ours))
        mb_s = total / 1e6 / statistics.median(ours)
        self.report("bundle", mb_s, "MB/s (200 MB float32 weights)", ratio,
                    f"zstandard level 3 alone ({fmt(total / 1e6 / statistics.median(zstd_alone))} MB/s)",
                    "ratio >= 0.9", ratio >= 0.9, samples={"ours_s": ours, "zstd_s": zstd_alone},
                    compressed_bytes=size)

    # -- manifest reload ------------------------------------------------------------------------------

    def manifest(self) -> None:
        text = manifest_text(10_000)
        rounds = 1 if self.quick else 3
        first, again, parse_only = [], [], []
        import tomllib

        for _ in range(rounds):
            work = self.dir("manifest")
            path = work / "manifest.toml"
            with serve(work, manifest=path) as server:
                path.write_text(text)
                op = {"x-operator-token": TOKEN}
                t0 = time.perf_counter()
                status, body = call(server.url, "POST", "/v1/manifest/reload", {}, op)
                first.append(time.perf_counter() - t0)
                assert status == 200 and body["added"] == 10_000, body
                t0 = time.perf_counter()
                status, body = call(server.url, "POST", "/v1/manifest/reload", {}, op)
                again.append(time.perf_counter() - t0)
                assert status == 200 and body["kept"] == 10_000, body
            t0 = time.perf_counter()
            tomllib.loads(text)
            parse_only.append(time.perf_counter() - t0)
        f, a, p = statistics.median(first), statistics.median(again), statistics.median(parse_only)
        self.report("manifest_reload", f, "s (10,000 jobs)", f / p, f"tomllib.loads of the file alone ({fmt(p)} s)",
                    "<= 2 s", f <= 2, samples=first)
        self.report("manifest_reload_again", a, "s (same file)", a / p, f"tomllib.loads of the file alone ({fmt(p)} s)",
                    "<= 0.5 s", a <= 0.5, samples=again)

    # -- CLI start-up -------------------------------------------------------------------------------

    def cli(self) -> None:
        from cis490fleet import zipbuild

        work = self.dir("cli")
        pyz = zipbuild.build(work / "cis490fleet.pyz")
        queue = build_queue(self.work / "templates" / "cli.sqlite3", jobs_json(10_000))
        fresh_data(work, queue)
        example = ROOT / "etc" / "training_manifest.toml.example"
        runs = 5 if self.quick else 15
        py = [python3(), "-I"]
        times: dict[str, list[float]] = {"status": [], "http_floor": [], "check": [], "toml_floor": []}
        with serve(work) as server:
            commands = {
                "status": py + [str(pyz), "jobs", "status", "--receiver", server.url],
                "http_floor": py + ["-c", "import http.client, json"],
                "check": py + [str(pyz), "manifest", "check", str(example)],
                "toml_floor": py + ["-c", "import tomllib"],
            }
            # The pyz keeps its compiled modules in a per-user folder (bytecode_cache): the first start
            # after an install compiles them (timed as "cold"), every later one reads them.
            env = {k: v for k, v in os.environ.items() if not k.startswith("CIS490_")}
            env["CIS490_CACHE_DIR"] = str(work / "bytecode-cache")
            for name, argv in commands.items():  # warm the page cache and the bytecode cache
                t0 = time.perf_counter()
                subprocess.run(argv, capture_output=True, env=env, timeout=60, check=True)
                times.setdefault(f"{name}_cold", []).append(time.perf_counter() - t0)
            for _ in range(runs):
                for name, argv in commands.items():
                    t0 = time.perf_counter()
                    subprocess.run(argv, capture_output=True, env=env, timeout=60, check=True)
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        r1 = med["status"] / med["http_floor"]
        r2 = med["check"] / med["toml_floor"]
        self.report("cli_jobs_status", med["status"] * 1000,
                    f"ms (10,000 jobs; first start after install {fmt(med['status_cold'] * 1000)} ms)", r1,
                    f"python3 -I -c 'import http.client, json' ({fmt(med['http_floor'] * 1000)} ms)", "ratio <= 1.5",
                    r1 <= 1.5, samples=times)
        self.report("cli_manifest_check", med["check"] * 1000,
                    f"ms (first start after install {fmt(med['check_cold'] * 1000)} ms)", r2,
                    f"python3 -I -c 'import tomllib' ({fmt(med['toml_floor'] * 1000)} ms)", "ratio <= 1.5", r2 <= 1.5,
                    samples=times)

    # -- idle coordinator ----------------------------------------------------------------------------

    def idle(self) -> None:
        window = 10.0 if self.quick else 60.0
        work = self.dir("idle")
        manifest = work / "manifest.toml"
        manifest.write_text('[fleet]\nheartbeat_s = 30\n\n[[jobs]]\nmodel = "gpuonly"\nmode = "train"\n'
                            "require_cuda = true\n")
        stop = threading.Event()
        with serve(work, manifest=manifest) as server:
            pollers = [threading.Thread(target=_idle_worker, args=(server.port, f"idle{i}", stop), daemon=True)
                       for i in range(20)]
            for t in pollers:
                t.start()
            time.sleep(4.0)
            reset_hwm(server.pid)
            c0, t0 = cpu_seconds(server.pid), time.monotonic()
            time.sleep(window)
            c1, t1 = cpu_seconds(server.pid), time.monotonic()
            status = proc_status(server.pid)
            stop.set()
        for t in pollers:
            t.join(30)
        cpu = (c1 - c0) / (t1 - t0) * 100
        self.report("idle_rss", status["VmHWM"], "MiB (20 workers long-polling)", status["VmHWM"] / 30,
                    "the goal of 30 MiB", "<= 30 MiB", status["VmHWM"] <= 30, rss=status)
        self.report("idle_cpu", cpu, f"% of a core over {window:.0f} s", cpu / 1.0, "the goal of 1%", "<= 1%",
                    cpu <= 1.0)

    # -- replicated group: failover, throughput vs one peer, catch-up (bench/failover.py) ----------

    def placement(self) -> None:
        import placement

        placement.report(self)

    def failover(self) -> None:
        import failover

        failed = failover.run_all(self)
        if failed:
            raise RuntimeError(f"{', '.join(failed)} failed")


def _idle_worker(port: int, host: str, stop: threading.Event) -> None:
    """A worker with nothing to do: long-polling claims (60 s each) until ``stop`` and the server goes away."""
    body = json.dumps({"capability": CPU, "wait": 60}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
    try:
        while not stop.is_set():
            conn.request("POST", "/v1/job/claim", body, {"x-lab-host": host, "content-type": "application/json"})
            conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        pass  # the server stopped under a waiting claim
    finally:
        conn.close()


# -- ceilings and data ------------------------------------------------------------------------------


def _write_random(path: Path, size: int) -> str:
    """Random bytes, as a compressed bundle looks; returns their sha256 (what make_bundle gives the worker)."""
    rng = random.Random(1)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            chunk = rng.randbytes(n)
            digest.update(chunk)
            f.write(chunk)
            left -= n
    return digest.hexdigest()


def _write_weights(path: Path, size: int, seed: int) -> None:
    """float32 values of one narrow magnitude band with random signs and mantissas, like trained weights."""
    rng = random.Random(seed)
    table = bytes((b & 0x80) | 0x3C for b in range(256))
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            chunk = bytearray(rng.randbytes(n))
            chunk[3::4] = chunk[3::4].translate(table)
            f.write(chunk)
            left -= n


def _zstd_alone(src: Path, dest: Path) -> None:
    import zstandard

    with open(dest, "wb") as raw:
        with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as out:
            for path in sorted(src.iterdir()):
                with open(path, "rb") as f:
                    while chunk := f.read(MiB):
                        out.write(chunk)
        raw.flush()
        os.fsync(raw.fileno())
    dest.unlink()


def _local_ceiling(src: Path, dest: Path) -> float:
    """Seconds to hash, write and fsync ``src`` locally: what any upload of it costs at least."""
    t0 = time.perf_counter()
    digest = hashlib.sha256()
    with open(src, "rb") as f, open(dest, "wb") as out:
        while chunk := f.read(MiB):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - t0
    dest.unlink()
    return seconds


def _tls_files(work: Path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = work / "ca.pem", work / "cert.pem", work / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        with open(cert_file, "ab") as f:
            f.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(key_file))
    ctx = ssl.create_default_context(cafile=str(ca_file))
    return ca_file, cert_file, key_file, ctx


def _tls_ceiling(src: Path, work: Path, cert_file: Path, key_file: Path, ca_file: Path) -> float:
    """Seconds to receive ``src`` over a raw loopback TLS socket, hashing, writing and fsyncing it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    sender = subprocess.Popen([sys.executable, str(HERE / "loadgen.py"), "tls-send", str(port), str(src),
                               str(ca_file)])
    try:
        listener.settimeout(60)
        raw, _ = listener.accept()
        t0 = time.perf_counter()
        with ctx.wrap_socket(raw, server_side=True) as sock, open(work / "tls-ceiling.bin", "wb") as out:
            sock.settimeout(120)
            digest = hashlib.sha256()
            buf = bytearray(MiB)
            view = memoryview(buf)
            while n := sock.recv_into(buf):
                digest.update(view[:n])
                out.write(view[:n])
            out.flush()
            os.fsync(out.fileno())
        seconds = time.perf_counter() - t0
    finally:
        listener.close()
        sender.wait(120)
        (work / "tls-ceiling.bin").unlink(missing_ok=True)
    return seconds


NAMES = ("claim", "cycle", "scale", "dispatch", "upload", "bundle", "manifest", "cli", "idle", "failover", "placement")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller inputs, one round each (about a minute and a half)")
    p.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(NAMES)}")
    p.add_argument("--out", default=str(HERE / "results.json"), help="where to write all figures as JSON")
    args = p.parse_args(argv)
    chosen = [n for n in NAMES if not args.only or n in args.only]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cis490-bench-") as tmp:
        bench = Bench(args.quick, Path(tmp))
        failed = []
        for name in chosen:
            try:
                getattr(bench, name)()
            except Exception as err:  # one broken benchmark must not hide the others' figures
                failed.append(name)
                print(f"{name}: FAILED ({type(err).__name__}: {err})", flush=True)
    doc = {"quick": args.quick, "python": platform.python_version(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "started": started, "seconds": time.time() - started,
           "figures": bench.figures, "failed": failed}
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
