#!/usr/bin/env python3
"""The Quickstart demo: a coordinator and two workers on loopback train etc/demo_manifest.toml.

    python3 make.py demo [--peers N] [--keep] [--timeout S] [--manifest FILE]

Builds dist/cis490fleet.pyz, starts `serve` from it with its data under demo-run/
(`--peers 3`: three peers of one replicated group, as README's "Several coordinators"
and "Security" sections start them: a cluster key file that the first peer creates, its own
data folder and `--node-id` each, the same `--peer` list everywhere), enrolls two hosts
with `jobs hosts add` (each key saved, mode 0600, to a file), starts two workers
(`work --once --host-key-file`, distinct host ids, every peer's URL a receiver), shows each job's progress
until every job is final (on the way it kills, with SIGKILL, the worker training the
job named "mlp-resume" once that job's checkpoint is on the coordinator, and checks that
the other worker finishes it from that checkpoint), fetches every model into demo-run/models/ with
`jobs fetch` (with peers: waits until every peer has applied the same log, and shows `jobs peers`),
prints the results table, and stops everything it started (also on Ctrl-C or an error).
Exit 0 only when every job completed. `--keep` leaves the coordinator running
(until Ctrl-C) so the printed `jobs` commands can be tried.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FINAL = ("completed", "failed", "cancelled")


def say(text: str = "") -> None:
    print(text, flush=True)


class Fleet:
    """Every process the demo starts, so that all of them stop together."""

    def __init__(self, run_dir: Path, pyz: Path):
        self.run_dir = run_dir
        self.pyz = pyz
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.url = ""
        self.urls: list[str] = []  # every coordinator's URL: one, or each peer's
        self.cluster_key_file = run_dir / "cluster.key"
        self.peer_argv: list[tuple[str, ...]] = []  # each peer's serve arguments, to show how to start it again
        self.token_file = secret_file(run_dir / "operator.token", secrets.token_hex(16))
        self.token = self.token_file.read_text().strip()
        os.environ["CIS490_OPERATOR_TOKEN"] = self.token  # the demo's own reads, and every process it starts

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", CIS490_OPERATOR_TOKEN=self.token)
        env.pop("CIS490_RECEIVER", None)
        return env

    def start(self, name: str, *args: str) -> subprocess.Popen:
        logf = open(self.run_dir / f"{name}.log", "ab")
        env = self.env()
        kwargs = {"start_new_session": True} if os.name != "nt" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        proc = subprocess.Popen([sys.executable, str(self.pyz), *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, env=env, **kwargs)
        logf.close()
        self.procs.append((name, proc))
        return proc

    def serve_peers(self, manifest: Path, n: int, timeout: float = 60.0) -> list[str]:
        """``n`` peers of one group on loopback, started as README says: peer a first, which creates the
        cluster key file (mode 0600); then the others with that same file. Returns once a majority names a
        leader."""
        ids = "abcdefghi"[:n]
        urls = {nid: f"http://127.0.0.1:{port}" for nid, port in zip(ids, free_ports(n))}
        peer_args = [arg for nid in ids for arg in ("--peer", f"{nid}={urls[nid]}")]
        for nid in ids:
            args = ("serve", "--node-id", nid, "--data", str(self.run_dir / f"data-{nid}"),
                    "--bind", urls[nid].split("//")[1], *peer_args, "--cluster-key-file", str(self.cluster_key_file),
                    "--manifest", str(manifest), "--operator-token-file", str(self.token_file))
            self.peer_argv.append(args)
            self.start(f"serve-{nid}", *args)
            if nid == ids[0]:
                self._wait(f"serve-{nid}", lambda: self.cluster_key_file.is_file()
                           and len(self.cluster_key_file.read_text().strip()) == 64, timeout, "create the cluster key")
        self.urls = [urls[nid] for nid in ids]
        self.url = self.urls[0]
        self._wait("serve-a", lambda: self.leader() is not None, timeout, "elect a leader")
        return self.urls

    def _wait(self, name: str, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for pname, proc in self.procs:
                if pname.startswith("serve") and proc.poll() is not None:
                    log = self.run_dir / f"{pname}.log"
                    raise SystemExit(f"demo: {pname} exited with code {proc.returncode}; see {log}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: the coordinators did not {what} within {timeout:.0f}s; "
                                 f"see {self.run_dir}/serve-*.log")
            time.sleep(0.1)

    def healths(self) -> dict[str, dict]:
        import urllib.request

        found = {}
        for url in self.urls:
            try:
                with urllib.request.urlopen(url + "/v1/health", timeout=2) as resp:
                    found[url] = json.load(resp)
            except (OSError, ValueError):
                pass
        return found

    def leader(self) -> str | None:
        """The URL of the peer that leads, once a majority of the group names it."""
        hs = self.healths()
        for url, h in hs.items():
            if h.get("role") == "leader":
                votes = sum(1 for o in hs.values() if o.get("leader") == h.get("node_id") and o.get("term") == h.get("term"))
                if votes * 2 > len(self.urls):
                    return url
        return None

    def converged(self, timeout: float = 30.0) -> int:
        """The applied index every peer has reached, once all report the same one; 0 if they do not in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hs = self.healths()
            applied = {h.get("applied") for h in hs.values()}
            if len(hs) == len(self.urls) and len(applied) == 1 and None not in applied:
                return applied.pop()
            time.sleep(0.2)
        return 0

    def serve(self, manifest: Path, timeout: float = 60.0) -> str:
        port_file = self.run_dir / "serve.port"
        proc = self.start("serve", "serve", "--data", str(self.run_dir / "data"), "--manifest", str(manifest),
                          "--bind", "127.0.0.1:0", "--port-file", str(port_file),
                          "--operator-token-file", str(self.token_file))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"demo: the coordinator exited with code {proc.returncode}; "
                                 f"see {self.run_dir / 'serve.log'}:\n{tail(self.run_dir / 'serve.log')}")
            text = port_file.read_text().strip() if port_file.exists() else ""
            if text:
                self.url = text if "://" in text else f"http://127.0.0.1:{text}"
                self.urls = [self.url]
                if self.healthy():
                    return self.url
            time.sleep(0.1)
        raise SystemExit(f"demo: the coordinator did not answer within {timeout:.0f}s; "
                         f"see {self.run_dir / 'serve.log'}")

    def healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/v1/health", timeout=2) as resp:
                return json.load(resp).get("ok") is True
        except (OSError, ValueError):
            return False

    def receivers(self) -> list[str]:
        return [arg for url in self.urls for arg in ("--receiver", url)]

    def jobs_cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(self.pyz), "jobs", *self.receivers(), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=self.env())

    def host_key_file(self, host: str) -> Path:
        """`jobs hosts add HOST`: the host's key, kept in a file only this user can read."""
        proc = self.jobs_cli("hosts", "add", host, "--json")
        if proc.returncode != 0:
            raise SystemExit(f"demo: jobs hosts add {host} failed ({proc.returncode}): {proc.stderr.strip()}")
        return secret_file(self.run_dir / f"{host}.key", json.loads(proc.stdout)["key"])

    def stop(self, grace: float = 15.0) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"demo: {name} did not stop within {grace:.0f}s; killing it")
                _signal(proc, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.name == "nt":
            proc.send_signal(signal.CTRL_BREAK_EVENT) if sig == signal.SIGTERM else proc.kill()
        else:
            os.kill(proc.pid, sig)
    except (ProcessLookupError, OSError):
        pass


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def secret_file(path: Path, text: str) -> Path:
    """``text`` in a new file created readable by this user alone (mode 0600 from the start)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now (the peers' URLs must be known before any of them starts)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def fetch_json(url: str) -> dict:
    """A read of the coordinator, with the demo's operator token (reads need a token)."""
    import urllib.request

    request = urllib.request.Request(url, headers={"x-operator-token": os.environ.get("CIS490_OPERATOR_TOKEN", "")})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


def fetch_jobs(url: str) -> list[dict]:
    return fetch_json(url + "/v1/jobs")["jobs"]


class Crash:
    """Kills the worker training job ``name`` (and its trainer) with SIGKILL once the coordinator holds a
    checkpoint of it past epoch 1, as a host that loses power would; ``report`` tells how the job ended."""

    def __init__(self, fleet: Fleet, run_dir: Path, name: str = "mlp-resume"):
        self.fleet, self.run_dir, self.name = fleet, run_dir, name
        self.host: str | None = None
        self.epoch: int | None = None
        self.job_id: str | None = None

    def check(self, jobs: list[dict]) -> None:
        job = next((j for j in jobs if j.get("name") == self.name), None)
        if self.host is not None or os.name == "nt" or job is None or job["status"] != "running":
            return
        saved = [c for c in fetch_json(f"{self.fleet.url}/v1/job/{job['id']}")["job"].get("checkpoints") or []
                 if (c.get("epoch") or 0) >= 2]
        worker = next((p for n, p in self.fleet.procs if n == f"worker-{job.get('host')}"), None)
        if not saved or worker is None:
            return
        self.host, self.epoch, self.job_id = job["host"], saved[-1]["epoch"], job["id"]
        _signal(worker, signal.SIGKILL)
        for pid_file in (self.run_dir / f"work-{self.host}" / job["id"]).glob("attempt-*/trainer.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        say(f"demo: killed worker {self.host} (SIGKILL, trainer too) while it trained {self.name}; its checkpoint "
            f"of epoch {self.epoch} is on the coordinator, so the other worker takes the job over from there once "
            "its heartbeats have stopped for stale_after_s")

    def report(self) -> int:
        """0 when the killed job completed on another host from a checkpoint; else 1, saying what happened."""
        if self.host is None:
            if os.name != "nt" and any(j.get("name") == self.name for j in fetch_jobs(self.fleet.url)):
                say(f"demo: {self.name} finished before a checkpoint of it reached the coordinator; nothing killed")
                return 1
            return 0
        job = fetch_json(f"{self.fleet.url}/v1/job/{self.job_id}")["job"]
        last = job["attempts"][-1]
        log = self.run_dir / f"work-{last['host']}" / self.job_id / f"attempt-{last['number']}" / "train.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        if job["status"] != "completed" or last["host"] == self.host or "resuming from the checkpoint" not in text:
            say(f"demo: {self.name} did not finish from its checkpoint on another host; see {log}")
            return 1
        resumed = text.split("resuming from the checkpoint")[1].split("\n")[0].split(" after ")[-1]
        say(f"demo: {self.name} was resumed by {last['host']} from the checkpoint {self.host} left "
            f"(after {resumed}) and completed: attempt {last['number']}, not a fresh start")
        return 0


def progress_text(job: dict) -> str:
    p = job.get("progress") or {}
    if job.get("status") not in ("claimed", "running") or not isinstance(p, dict):
        return ""
    parts = []
    frac = p.get("fraction")
    if isinstance(frac, (int, float)) and not isinstance(frac, bool):
        frac = max(0.0, min(1.0, float(frac)))
        parts.append("[" + "#" * int(frac * 16) + "." * (16 - int(frac * 16)) + f"] {100 * frac:3.0f}%")
    if p.get("epoch") is not None:
        parts.append(f"epoch {p['epoch']}" + (f"/{p['epochs']}" if p.get("epochs") is not None else ""))
    if isinstance(p.get("loss"), (int, float)):
        parts.append(f"loss {p['loss']:.4f}")
    return " ".join(parts)


def job_name(job: dict) -> str:
    return job.get("name") or job["id"][:12]


class View:
    """A compact live table on a terminal; one line per change otherwise."""

    def __init__(self, tty: bool):
        self.tty = tty
        self.drawn = 0
        self.seen: dict[str, tuple] = {}

    def show(self, jobs: list[dict], elapsed: float) -> None:
        if self.tty:
            counts: dict[str, int] = {}
            for j in jobs:
                counts[j["status"]] = counts.get(j["status"], 0) + 1
            lines = [f"{elapsed:5.0f}s  " + "  ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
            for j in jobs:
                lines.append(f"  {job_name(j):<18} {j['model'] + '/' + j['mode']:<20} {j['status']:<10} "
                             f"{j.get('host') or '':<8} {progress_text(j)}")
            sys.stdout.write("\x1b[1A\x1b[2K" * self.drawn + "\n".join(lines) + "\n")
            sys.stdout.flush()
            self.drawn = len(lines)
            return
        for j in jobs:
            p = j.get("progress") if isinstance(j.get("progress"), dict) else {}
            key = (j["status"], j.get("host"), p.get("epoch"))
            if self.seen.get(j["id"]) != key:
                self.seen[j["id"]] = key
                extra = progress_text(j)
                say(f"{elapsed:5.0f}s  {job_name(j):<18} {j['status']:<10} {j.get('host') or ''}"
                    + (f"  {extra}" if extra else ""))


def build_zipapp(dest: Path) -> None:
    say("demo: building the zipapp")
    proc = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "-o", str(dest)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not dest.is_file():
        raise SystemExit(f"demo: building the zipapp failed:\n{proc.stdout}{proc.stderr}")
    say(f"      {proc.stdout.strip()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", default=str(ROOT / "etc" / "demo_manifest.toml"))
    ap.add_argument("--run-dir", default=str(ROOT / "demo-run"), help="everything the demo writes (wiped first)")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    ap.add_argument("--keep", action="store_true", help="leave the coordinator running after the demo")
    ap.add_argument("--pyz", default=str(ROOT / "dist" / "cis490fleet.pyz"), help="where to build the zipapp")
    ap.add_argument("--peers", type=int, default=1, metavar="N",
                    help="coordinators: 1 (default) runs one; 3 runs three peers of a replicated group")
    opts = ap.parse_args(argv)
    if opts.peers < 1 or opts.peers > 9:
        say(f"demo: --peers {opts.peers} is out of range; give 1 (one coordinator) or 3 (a group of three peers)")
        return 2

    run_dir = Path(opts.run_dir).resolve()
    manifest = Path(opts.manifest).resolve()
    if not manifest.is_file():
        say(f"demo: manifest {manifest} not found; pass --manifest FILE")
        return 2
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    pyz = Path(opts.pyz).resolve()
    build_zipapp(pyz)

    fleet = Fleet(run_dir, pyz)
    signal.signal(signal.SIGINT, _interrupt)
    if os.name != "nt":
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if opts.peers == 1:
            url = fleet.serve(manifest)
            say(f"demo: coordinator at {url} (data in {run_dir / 'data'}, log {run_dir / 'serve.log'})")
        else:
            fleet.serve_peers(manifest, opts.peers)
            say(f"demo: {opts.peers} coordinator peers at {', '.join(fleet.urls)} (cluster key "
                f"{fleet.cluster_key_file}, data in {run_dir}/data-*, logs {run_dir}/serve-*.log); "
                f"leader {fleet.leader()}")
        for host in ("demo-a", "demo-b"):
            key_file = fleet.host_key_file(host)
            say(f"demo: jobs hosts add {host}: its key is in {key_file} (mode 0600)")
            fleet.start(f"worker-{host}", "work", *fleet.receivers(), "--host-id", host,
                        "--host-key-file", str(key_file), "--work-dir", str(run_dir / f"work-{host}"), "--once", "--wait", "5", "--grace", "10")
        say(f"demo: workers demo-a and demo-b started (logs {run_dir}/worker-*.log)")
        crash = Crash(fleet, run_dir)
        code = watch(fleet, run_dir, opts.timeout, crash) or crash.report()
        if code != 0:
            return code
        code = fetch_models(fleet, run_dir) or show_peers(fleet) or show_results(fleet)
        if code != 0:
            return code
        advise(fleet, run_dir, manifest, opts.keep)
        if opts.keep:
            say(f"demo: the {'coordinator peers keep' if fleet.peer_argv else 'coordinator keeps'} running; "
                "Ctrl-C stops it")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        say("\ndemo: interrupted; stopping everything it started")
        return 0 if opts.keep else 130
    finally:
        fleet.stop()


def watch(fleet: Fleet, run_dir: Path, timeout: float, crash: Crash) -> int:
    view = View(sys.stdout.isatty())
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        try:
            jobs = fetch_jobs(fleet.url)
        except OSError as err:
            say(f"demo: cannot list jobs ({err})")
            return 1
        view.show(jobs, elapsed)
        try:
            crash.check(jobs)
        except OSError as err:
            say(f"demo: cannot read a job's checkpoints ({err})")
            return 1
        if jobs and all(j["status"] in FINAL for j in jobs):
            break
        workers = [p for name, p in fleet.procs if name.startswith("worker")]
        if all(p.poll() is not None for p in workers):
            time.sleep(1)
            if not all(j["status"] in FINAL for j in fetch_jobs(fleet.url)):
                say("demo: both workers exited but some jobs are not finished; worker logs:")
                for log in sorted(run_dir.glob("worker-*.log")):
                    say(f"--- {log.name}\n{tail(log)}")
                return 1
        if elapsed > timeout:
            say(f"demo: not finished after {timeout:.0f}s; giving up")
            return 1
        time.sleep(0.5)
    bad = [j for j in jobs if j["status"] != "completed"]
    say(f"demo: all {len(jobs)} jobs final in {time.monotonic() - started:.0f}s")
    if bad:
        for j in bad:
            say(f"demo: job {job_name(j)} {j['status']}: {j.get('last_error') or ''}")
            detail = fleet.jobs_cli("show", j["id"])
            say(detail.stdout + detail.stderr)
        return 1
    return 0


def fetch_models(fleet: Fleet, run_dir: Path) -> int:
    """`jobs fetch --extract` each job's model into demo-run/models/<job name>/."""
    for job in fetch_jobs(fleet.url):
        dest = run_dir / "models" / job_name(job)
        dest.mkdir(parents=True, exist_ok=True)
        proc = fleet.jobs_cli("fetch", job["id"], "-o", str(dest), "--extract", "--json")
        if proc.returncode != 0:
            say(f"demo: jobs fetch {job['id'][:12]} failed ({proc.returncode}): {proc.stderr.strip()}")
            return 1
        try:
            extracted = Path(json.loads(proc.stdout)["extracted"])
        except (ValueError, KeyError, TypeError):
            extracted = dest
        say(f"demo: fetched {job_name(job):<14} {rel(extracted)}/  {score(extracted)}")
    return 0


def show_peers(fleet: Fleet) -> int:
    """With peers: every one has applied the same log (`jobs peers` shows it); a single coordinator has nothing to show."""
    if len(fleet.urls) < 2:
        return 0
    applied = fleet.converged()
    if not applied:
        say(f"demo: the peers did not reach the same applied index within 30s: {fleet.healths()}")
        return 1
    proc = fleet.jobs_cli("peers")
    say("")
    say(f"demo: every peer has applied the log up to index {applied} (jobs peers):")
    for line in (proc.stdout + proc.stderr).rstrip().splitlines():
        say(f"  {line}")
    return 0 if proc.returncode == 0 else 1


def show_results(fleet: Fleet) -> int:
    """The answer: `jobs results`, every completed job with its hyper values and final metrics, best first."""
    proc = fleet.jobs_cli("results")
    if proc.returncode != 0:
        say(f"demo: jobs results failed ({proc.returncode}): {proc.stderr.strip()}")
        return 1
    say("")
    say("demo: results, best first (jobs results):")
    for line in proc.stdout.rstrip().splitlines():
        say(f"  {line}")
    return 0


def score(folder: Path) -> str:
    """The final validation accuracy the built-in trainer wrote, when there is one."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        last = metrics["history"][-1]
        return f"val_accuracy {last['val_accuracy']:.3f} after {last['epoch']} epochs"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""


def rel(path: Path) -> str:
    """A path as the user would type it from the repository root."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def advise(fleet: Fleet, run_dir: Path, manifest: Path, keep: bool) -> None:
    pyz = f"python3 {rel(fleet.pyz)}"
    say("")
    store = rel(run_dir / ("data-*" if fleet.peer_argv else "data") / "models")
    say(f"Models: {rel(run_dir / 'models')}/   (the coordinator's store: {store}/)")
    if fleet.peer_argv and not keep:
        say("To look around, start the peers again on the demo's data (the same ports: the group's log names them):")
        for args in fleet.peer_argv:
            say(f"  {pyz} " + " ".join(rel(Path(a)) if a.startswith(str(ROOT)) else a for a in args) + " &")
        say(f"  export CIS490_RECEIVER={','.join(fleet.urls)}")
    elif not keep:
        say("To look around, start the coordinator again on the demo's data:")
        say(f"  {pyz} serve --data {rel(run_dir / 'data')} --manifest {rel(manifest)} --bind 127.0.0.1:8445 "
            f"--operator-token-file {rel(fleet.token_file)} &")
        say("  export CIS490_RECEIVER=http://127.0.0.1:8445")
    else:
        say(f"  export CIS490_RECEIVER={','.join(fleet.urls)}")
    say(f"  export CIS490_OPERATOR_TOKEN=$(cat {rel(fleet.token_file)})")
    say(f"  {pyz} jobs status          # counts, workers, running jobs")
    say(f"  {pyz} jobs list            # every job with its host and artifact")
    say(f"  {pyz} jobs show ID         # one job: spec, attempts, log tail (an id prefix will do)")
    say(f"  {pyz} jobs fetch ID -o DIR # download and verify a job's model")
    say(f"  {pyz} jobs results --csv   # the results table for a spreadsheet")
    say(f"  or open the dashboard at {fleet.url if keep or fleet.peer_argv else 'http://127.0.0.1:8445'}/")


if __name__ == "__main__":
    raise SystemExit(main())
