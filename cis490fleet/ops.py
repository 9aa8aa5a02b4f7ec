"""The ``jobs`` operator CLI: status, list, show, failures, cancel, requeue, reload, workers, logs, fetch, watch,
peers.

Shell over ``client.Client``: every command is a few requests and a rendering.
Read commands print the server's JSON unchanged with ``--json``; tables are
aligned and coloured only on a terminal. Expected failures are one line on
stderr and an exit code; nothing heavy is imported at start-up.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cis490fleet import errors, failure_text, results, submission
from cis490fleet.errors import (  # noqa: F401 (jobs documents all six)
    EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAUTHORISED, EXIT_UNREACHABLE, EXIT_USAGE, exit_code,
)
from cis490fleet.client import ENV_RECEIVER, Client
from cis490fleet.progress import format_duration, format_progress, observe, progress_line, terminal_columns

log = logging.getLogger(__name__)

STATUS_ORDER = ("pending", "claimed", "running", "completed", "failed", "cancelled")
FINAL = frozenset({"completed", "failed", "cancelled"})
COLORS = {"pending": "33", "claimed": "36", "running": "36;1", "completed": "32", "failed": "31;1",
          "cancelled": "2", "live": "32", "down": "31", "left": "2", "leader": "32;1", "unreachable": "31;1"}


# -- rendering --------------------------------------------------------------------------------------


def _manifest_cell(info: object, now: float) -> str | None:
    """The manifest a peer has applied: its sha256's first 12 digits and how long ago it was applied."""
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
        return None
    applied = info.get("applied")
    age = f" {format_duration(now - applied)} ago" if isinstance(applied, (int, float)) else ""
    return info["sha256"][:12] + age


class Out:
    """stdout with colour decided once: only on a terminal, never with --no-color or NO_COLOR."""

    def __init__(self, stream, color: bool | None):
        self.stream = stream
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self.tty = tty
        self.color = tty and color is not False and not os.environ.get("NO_COLOR")

    def paint(self, text: str, key: str) -> str:
        code = COLORS.get(key)
        return f"\x1b[{code}m{text}\x1b[0m" if self.color and code else text

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def table(self, headers: list[str], rows: list[list[Any]], paint: dict[int, Callable[[str], str]] | None = None,
              indent: str = "") -> None:
        cells = [[_cell(v) for v in row] for row in rows]
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
        self.line(indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
        for row in cells:
            parts = []
            for i, (text, width) in enumerate(zip(row, widths)):
                padded = text.ljust(width) if i < len(row) - 1 else text
                if paint and i in paint and text:
                    padded = padded.replace(text, paint[i](text), 1)
                parts.append(padded)
            self.line(indent + "  ".join(parts).rstrip())

    def json(self, value: Any) -> None:
        self.line(json.dumps(value, indent=2, sort_keys=True))


def _gpu_list(gpus: Any) -> str:
    """An attempt's GPUs: "0,1", "cpu" when its slot gave it none, "-" when the worker sent no slot."""
    if not isinstance(gpus, list):
        return "-"
    return ",".join(str(g) for g in gpus) or "cpu"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value).replace("\n", " ")


def timestamp(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 string; None when absent or unreadable."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        from datetime import datetime

        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def age(value: Any, now: float) -> str:
    """How long ago ``value`` was, as '1m20s' (a clock slightly ahead of ours reads as 0s)."""
    t = timestamp(value)
    return "-" if t is None else format_duration(max(0.0, now - t))


def ago(value: Any, now: float) -> str:
    text = age(value, now)
    return text if text == "-" else text + " ago"


def when(value: Any, now: float) -> str:
    t = timestamp(value)
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f" ({ago(t, now)})"


def byte_size(value: Any) -> str:
    """'812 B', '11.5 KiB', '2.0 GiB'."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return "-"
    size, unit = float(value), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{value} B" if unit == "B" else f"{size:.1f} {unit}"


def short(job_id: Any) -> str:
    return str(job_id or "-")[:12]


def job_started(job: dict) -> float | None:
    """When the job's current attempt began (``started`` of a job summary or detail); None when none holds it."""
    return timestamp(job.get("started"))


def count(value: Any) -> int:
    """A worker's running jobs: a list of ids or a number."""
    if isinstance(value, (list, tuple)):
        return len(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def log_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "".join(str(v) if str(v).endswith("\n") else f"{v}\n" for v in value)
    return str(value)


# -- the commands -----------------------------------------------------------------------------------


class Ops:
    """One invocation: parsed options, the client, the output."""

    def __init__(self, args: argparse.Namespace, out: Out, err_stream):
        self.args = args
        self.out = out
        self.err = err_stream
        self._client: Client | None = None
        self._history: dict[tuple, list[tuple[float, float]]] = {}

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.args.receiver or None, ca=self.args.ca, cert=self.args.cert,
                                  key=self.args.key, timeout=self.args.timeout, retries=2)
        return self._client

    def complain(self, err: BaseException) -> None:
        if self.args.json:
            self.err.write(json_error(getattr(err, "code", "error"), str(err), exit_code(err)))
        else:
            self.err.write(f"cis490fleet jobs: {err}\n")

    # status ------------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Health, workers and the held jobs (their summaries carry ``started``, the current attempt's start):
        four requests however many jobs run."""
        c = self.client
        held = c.jobs(status="running").get("jobs", []) + c.jobs(status="claimed").get("jobs", [])
        return {"health": c.health(), "workers": c.workers().get("workers", []), "running": held}

    def cmd_status(self) -> int:
        snap = self.snapshot()
        if self.args.json:
            self.out.json(snap)
            return EXIT_OK
        now = time.time()
        health, workers, running = snap["health"], snap["workers"], snap["running"]
        out = self.out
        role = health.get("role") or "?"
        out.line(f"coordinator  {self.client.urls[self.client._preferred]}  {out.paint(role, role)}"
                 f"  term {health.get('term', '?')}  leader {health.get('leader') or '?'}"
                 f"  version {health.get('version', '?')}")
        workers_proof = str((health.get("security") or {}).get("workers") or "")
        if workers_proof.startswith("legacy"):
            out.line(f"WARNING      legacy mode (serve --trust-host-header): {workers_proof.split(': ', 1)[-1]}; any "
                     "client on the network can claim and complete jobs as any host")
        counts = health.get("jobs") or {}
        shown = [s for s in STATUS_ORDER if s in counts] + sorted(s for s in counts if s not in STATUS_ORDER)
        total = sum(v for v in counts.values() if isinstance(v, int))
        out.line("jobs         " + "  ".join(f"{out.paint(str(counts[s]), s) if counts[s] else 0} {s}"
                                             for s in shown) + f"  ({total} total)")
        live = [w for w in workers if w.get("live")]
        names = ", ".join(f"{w.get('host')} ({count(w.get('running'))}/{w.get('slots', '?')})" for w in live)
        out.line(f"workers      {len(live)} live of {len(workers)}" + (f": {names}" if names else ""))
        if running:
            out.line()
            out.line("running")
            rows = []
            for job in running:
                started = job_started(job)
                rows.append([short(job.get("id")), job.get("model"), job.get("mode"), job.get("status"),
                             job.get("host"), format_progress(job.get("progress"), started, now), age(started, now)])
            out.table(["ID", "MODEL", "MODE", "STATUS", "HOST", "PROGRESS", "AGE"], rows,
                      {3: lambda s: out.paint(s, s)}, indent="  ")
        return EXIT_OK

    # list / show -------------------------------------------------------------------------------

    def cmd_list(self) -> int:
        a = self.args
        result = self.client.jobs(status=a.status, model=a.model, host=a.host, limit=a.limit, offset=a.offset)
        if a.json:
            self.out.json(result)
            return EXIT_OK
        jobs = result.get("jobs", [])
        now = time.time()
        rows = [[short(j.get("id")), j.get("status"), j.get("model"), j.get("mode"), j.get("priority"),
                 j.get("host"), ago(j.get("updated"), now), j.get("name")] for j in jobs]
        if rows:
            self.out.table(["ID", "STATUS", "MODEL", "MODE", "PRIO", "HOST", "UPDATED", "NAME"], rows,
                           {1: lambda s: self.out.paint(s, s)})
        total = result.get("total", len(jobs))
        if not jobs:
            self.out.line("no jobs match" if total == 0 else f"no jobs in this page ({total} in all)")
        elif isinstance(total, int) and total > len(jobs) + (a.offset or 0):
            self.out.line(f"({len(jobs)} shown of {total}; see more with --limit/--offset)")
        return EXIT_OK

    def cmd_show(self) -> int:
        result = self.client.job(self.args.id)
        if self.args.json:
            self.out.json(result)
            return EXIT_OK
        job = result.get("job") or {}
        out, now = self.out, time.time()
        status = str(job.get("status") or "?")
        fields = [
            ("id", job.get("id")),
            ("name", job.get("name")),
            ("model", job.get("model")),
            ("mode", job.get("mode")),
            ("status", out.paint(status, status)),
            ("host", job.get("host")),
            ("priority", job.get("priority")),
            ("seed", job.get("seed")),
            ("hyper", job.get("hyper")),
            ("in manifest", job.get("in_manifest")),
            ("created", when(job.get("created"), now)),
            ("updated", when(job.get("updated"), now)),
        ]
        if job.get("progress"):
            started = job_started(job) if status in ("claimed", "running") else None
            fields.append(("progress", format_progress(job.get("progress"), started, now)))
        if job.get("artifact_id"):
            fields.append(("artifact", job.get("artifact_id")))
        if job.get("peak_vram_gib"):
            fields.append(("peak VRAM", f"{float(job['peak_vram_gib']):.2f} GiB (measured by the trainer)"))
        spec = job.get("spec")
        if isinstance(spec, dict):
            known = {k for k, _ in fields} | {"id", "job_id", "in_manifest"}
            fields += [(f"spec.{k}", v) for k, v in sorted(spec.items()) if k not in known]
        width = max(len(k) for k, _ in fields)
        for key, value in fields:
            out.line(f"{key.ljust(width)}  {value if key == 'status' else _cell(value)}")
        why = job.get("why_pending")
        if why:
            out.line()
            out.line("why pending")
            for reason in why:
                out.line(f"  - {_cell(reason)}")
        attempts = job.get("attempts")
        if isinstance(attempts, list) and attempts:
            out.line()
            out.line("attempts")
            rows = [[a.get("number"), a.get("host"), _gpu_list(a.get("gpus")), when(a.get("started"), now),
                     when(a.get("ended"), now), a.get("outcome") or "(current)", a.get("class"),
                     failure_text.summary(a.get("error"))]
                    for a in attempts if isinstance(a, dict)]
            out.table(["#", "HOST", "GPUS", "STARTED", "ENDED", "OUTCOME", "CLASS", "ERROR"], rows, indent="  ")
        checkpoints = job.get("checkpoints")
        if isinstance(checkpoints, list) and checkpoints:
            out.line()
            out.line("checkpoints (the next attempt resumes from the newest)")
            rows = [[c.get("attempt"), "-" if c.get("epoch") is None else f"epoch {c['epoch']}",
                     byte_size(c.get("size")), ago(c.get("created"), now), c.get("host"), short(c.get("sha256"))]
                    for c in checkpoints if isinstance(c, dict)]
            out.table(["ATTEMPT", "EPOCH", "SIZE", "AGE", "HOST", "SHA256"], rows, indent="  ")
        actions = job.get("operator_actions")
        if isinstance(actions, list) and actions:
            out.line()
            out.line("operator actions")
            out.table(["WHEN", "ACTION", "BY"], [[when(a.get("at"), now), a.get("action"), a.get("by")]
                                                 for a in actions if isinstance(a, dict)], indent="  ")
        if job.get("last_error"):
            out.line()
            out.line("last error")
            for line in str(job["last_error"]).splitlines() or [""]:
                out.line(f"  {line}")
        tail = log_text(job.get("log_tail"))
        if tail:
            out.line()
            out.line("log tail")
            for line in tail.splitlines():
                out.line(f"  {line}")
        return EXIT_OK

    def cmd_failures(self) -> int:
        result = self.client.failures(self.args.limit)
        if self.args.json:
            self.out.json(result)
            return EXIT_OK
        failures = result.get("failures", [])
        if not failures:
            self.out.line("no failed attempts")
            return EXIT_OK
        now = time.time()
        rows = [[ago(f.get("ended"), now), short(f.get("job_id")), f.get("name"), f"{f.get('model')}/{f.get('mode')}",
                 f.get("attempt"), f.get("host"), f.get("outcome"), f.get("class"), f.get("status"),
                 failure_text.summary(f.get("error"))]
                for f in failures]
        self.out.table(["WHEN", "ID", "NAME", "MODEL/MODE", "ATTEMPT", "HOST", "OUTCOME", "CLASS", "NOW", "ERROR"],
                       rows, {8: lambda s: self.out.paint(s, s)})
        return EXIT_OK

    def cmd_results(self) -> int:
        answer = self.client.results(sweep=self.args.sweep, model=self.args.model, sort=self.args.sort,
                                     order=self.args.order)
        rows = answer.get("results", [])
        if self.args.json:
            self.out.json(answer)
            return EXIT_OK
        if self.args.csv:
            self.out.stream.write(results.to_csv(rows))
            return EXIT_OK
        if not rows:
            self.out.line("no completed jobs" + (f" in sweep {self.args.sweep}" if self.args.sweep else ""))
            return EXIT_OK
        head, body = results.table(rows)
        sort = answer.get("sort")
        self.out.table([h.upper() if h != sort else f"{h.upper()} ({answer.get('order')})" for h in head],
                       [[_result_cell(v) for v in line] for line in body])
        return EXIT_OK

    # writes ------------------------------------------------------------------------------------

    def _each(self, verb: str, act: Callable[[str], dict]) -> int:
        code = EXIT_OK
        results = []
        for ref in self.args.ids:
            try:
                job = self.client.job(ref).get("job") or {}
                job_id = job.get("id") or ref
                answer = act(job_id)
            except errors.FleetError as err:
                if isinstance(err, errors.Unavailable):
                    raise
                self.complain(err)
                code = code or exit_code(err)
                results.append({"id": ref, "error": err.code, "detail": str(err)})
                continue
            results.append({"id": job_id, **answer})
            if not self.args.json:
                self.out.line(f"{verb} {short(job_id)}  {job.get('name') or ''}".rstrip())
        if self.args.json:
            self.out.json(results)
        return code

    def cmd_cancel(self) -> int:
        return self._each("cancelled", self.client.cancel)

    def cmd_requeue(self) -> int:
        return self._each("requeued", self.client.requeue)

    def cmd_submit(self) -> int:
        """Jobs added without editing the manifest: a TOML snippet (FILE, or - for stdin), or built from flags."""
        a = self.args
        if a.file and a.model:
            raise errors.BadRequest("give a TOML file or --model/--mode flags, not both")
        if a.file:
            try:
                raw = sys.stdin.buffer.read() if a.file == "-" else Path(a.file).read_bytes()
                text = raw.decode("utf-8-sig")
            except OSError as err:
                raise errors.ConfigError(f"cannot read {a.file}: {err.strerror or err}") from None
            except UnicodeDecodeError:
                raise errors.ConfigError(f"{a.file} is not UTF-8 text") from None
        elif a.model and a.mode:
            text = submission.snippet_from_flags(model=a.model, mode=a.mode, hyper=a.hyper, sweep=a.sweep,
                                                 name=a.name, seed=a.seed)
        else:
            raise errors.BadRequest("say what to submit: a TOML file of [[jobs]]/[[sweeps]] (- for stdin), or "
                                    "--model M --mode X [--hyper k=v] [--sweep hyper.k=v1,v2]")
        result = self.client.submit(text, dry_run=a.dry_run)
        if a.json:
            self.out.json(result)
            return EXIT_OK
        jobs = result.get("jobs", [])
        if a.dry_run:
            self.out.line(f"would add {len(jobs)} job(s):" if jobs else "nothing to add: the queue has these jobs")
        else:
            self.out.line(f"added {result.get('added', 0)} job(s)"
                          + (f", {result['existing']} already in the queue" if result.get("existing") else ""))
        for job in jobs:
            self.out.line(f"  {job['id'][:12]}  {job.get('name') or '-'}  {job['model']}/{job['mode']}  "
                          f"{json.dumps(job.get('hyper') or {}, sort_keys=True)}")
        return EXIT_OK
    def cmd_hosts(self) -> int:
        from cis490fleet import hosts_cmd

        return hosts_cmd.run(self)

    def cmd_reload(self) -> int:
        """Send FILE's text from here; without FILE the receiving peer reloads its own --manifest."""
        text = name = None
        if self.args.file:
            try:
                text = Path(self.args.file).read_bytes().decode("utf-8-sig")
            except OSError as err:
                raise errors.ConfigError(f"cannot read manifest {self.args.file}: {err.strerror or err}") from None
            except UnicodeDecodeError:
                raise errors.ConfigError(f"manifest {self.args.file} is not UTF-8 text") from None
            name = self.args.file
        result = self.client.reload(text, name)
        if self.args.json:
            self.out.json(result)
        else:
            sha = (result.get("manifest") or {}).get("sha256")
            self.out.line("manifest reloaded" + (f" (sha256 {sha[:16]})" if sha else "") + ": " + ", ".join(
                f"{result.get(k, 0)} {k}" for k in ("added", "kept", "removed", "total")))
            if result.get("out_of_tries"):
                self.out.line(f"{result['out_of_tries']} pending job(s) failed: the new retries limit leaves them "
                              "no tries ('jobs list --status failed'; 'jobs requeue ID' gives a job its tries back)")
            if result.get("unclaimable"):
                self.out.line(f"{result['unclaimable']} pending job(s) stopped being claimable: they left the "
                              "manifest (bring them back, or 'jobs cancel ID')")
        return EXIT_OK

    # workers / peers ---------------------------------------------------------------------------

    def cmd_workers(self) -> int:
        result = self.client.workers()
        if self.args.json:
            self.out.json(result)
            return EXIT_OK
        workers = result.get("workers", [])
        if not workers:
            self.out.line("no workers have registered yet")
            return EXIT_OK
        now = time.time()
        rows = []
        for w in sorted(workers, key=lambda w: str(w.get("host"))):
            cap = w.get("capability") if isinstance(w.get("capability"), dict) else {}
            gpus = ", ".join(str(g.get("name") or "?") for g in cap.get("gpus") or [] if isinstance(g, dict))
            state = "live" if w.get("live") else "left" if w.get("left") else "down"
            rows.append([w.get("host"), state, ago(w.get("last_seen"), now),
                         f"{count(w.get('running'))}/{w.get('slots', '?')}", cap.get("os"), cap.get("cores"),
                         cap.get("ram_gib"), "yes" if cap.get("cuda") else "no", gpus or None])
        self.out.table(["HOST", "STATE", "LAST SEEN", "RUNNING", "OS", "CORES", "RAM GIB", "CUDA", "GPUS"], rows,
                       {1: lambda s: self.out.paint(s, s)})
        return EXIT_OK

    def _peer_change(self) -> int:
        a = self.args
        want = {"add": ["ID=URL"], "remove": ["ID"], "replace": ["OLD", "NEW=URL"]}[a.change]
        if len(a.peer_args) != len(want):
            raise errors.BadRequest(f"jobs peers {a.change} takes {' '.join(want)}, got {' '.join(a.peer_args) or 'nothing'}")
        if "=" in want[-1]:
            pid, sep, url = a.peer_args[-1].partition("=")
            if not sep or not pid or not url:
                raise errors.BadRequest(f"{a.peer_args[-1]!r} is not NEW=URL, e.g. d=https://coord-d.lab:8445")
        if a.change == "add":
            result = self.client.add_peer(pid, url)
        elif a.change == "remove":
            result = self.client.remove_peer(a.peer_args[0])
        else:
            result = self.client.replace_peer(a.peer_args[0], pid, url)
        if a.json:
            self.out.json(result)
        else:
            self.out.line(f"committed at index {result['index']}: voters {', '.join(result['voters'])}; learners "
                          f"{', '.join(result['learners']) or 'none'}")
            if a.change != "remove":
                self.out.line(f"start the new peer with: serve --node-id {pid} --join --peer {pid}={url} ...; the "
                              "leader makes it a voter once it has caught up (jobs peers shows it)")
        return EXIT_OK

    def cmd_peers(self) -> int:
        """Each coordinator's health; the members a peer lists (a replicated group) are asked too."""
        a = self.args
        if a.change:
            return self._peer_change()
        report = []
        pending = list(self.client.urls)
        seen = set()
        while pending:
            url = pending.pop(0).rstrip("/")
            if url in seen:
                continue
            seen.add(url)
            peer = Client([url], ca=a.ca, cert=a.cert, key=a.key, timeout=min(a.timeout, 5.0), retries=0)
            try:
                health = peer.health()
                report.append({"url": url, "health": health})
                if health.get("commit") is not None:
                    pending += [p["url"] for p in health.get("peers") or () if isinstance(p, dict) and p.get("url")]
            except errors.FleetError as err:
                report.append({"url": url, "error": err.code, "detail": str(err)})
            finally:
                peer.close()
        reachable = sum(1 for r in report if "health" in r)
        lag, member = {}, {}
        for r in report:
            h = r.get("health") or {}
            if h.get("role") == "leader":
                rows = [p for p in h.get("peers") or () if isinstance(p, dict)]
                lag = {p.get("id"): p.get("lag") for p in rows}
                member = {p.get("id"): p.get("member") for p in rows}
        if a.json:
            self.out.json(report)
        else:
            rows = []
            for r in report:
                h = r.get("health")
                if h is None:
                    rows.append([r["url"], "unreachable", None, None, None, None, None, None, None, None, None, None,
                                 r["detail"]])
                else:
                    node = h.get("node_id")
                    rows.append([r["url"], h.get("role"), h.get("term"), h.get("leader"), node,
                                 member.get(node, h.get("member")), h.get("commit"), h.get("applied"), lag.get(node),
                                 _manifest_cell(h.get("manifest"), time.time()), h.get("artifacts_missing"),
                                 h.get("version"), h.get("lost")])
            self.out.table(["URL", "ROLE", "TERM", "LEADER", "NODE", "MEMBER", "COMMIT", "APPLIED", "LAG",
                            "MANIFEST", "MISSING", "VERSION", "PROBLEM"], rows, {1: lambda s: self.out.paint(s, s)})
        if reachable == len(report):
            return EXIT_OK
        return EXIT_UNREACHABLE if reachable == 0 else EXIT_FAILED

    # logs / fetch ------------------------------------------------------------------------------

    def cmd_logs(self) -> int:
        a = self.args
        if a.attempt is not None:
            return self._stored_log(a.id, a.attempt)
        result = self.client.job(a.id)
        job = result.get("job") or {}
        if job.get("status") in FINAL and not a.follow:
            return self._stored_log(job.get("id") or a.id, None, job)
        if a.json and not a.follow:
            self.out.json(result)
            return EXIT_OK
        shown = log_text(job.get("log_tail"))
        self.out.stream.write(shown)
        self.out.stream.flush()
        if not a.follow:
            if not shown:
                self.err.write(f"job {short(job.get('id'))} has no log yet (it is {job.get('status')})\n")
            return EXIT_OK
        job_id = job.get("id") or a.id
        try:
            while job.get("status") not in FINAL:
                time.sleep(a.interval)
                job = self.client.job(job_id).get("job") or {}
                text = log_text(job.get("log_tail"))
                self.out.stream.write(new_log_text(shown, text))
                self.out.stream.flush()
                shown = text
        except KeyboardInterrupt:
            pass
        return EXIT_OK

    def _stored_log(self, ref: str, attempt: int | None, job: dict | None = None) -> int:
        """Print the whole log an attempt handed in (the newest when ``attempt`` is None)."""
        try:
            number, text = self.client.job_log(ref, attempt)
        except errors.NotFound:
            if attempt is not None or job is None:
                raise
            # A finished job whose attempts handed in no log (a worker older than the log upload): its tail.
            tail = log_text(job.get("log_tail"))
            if not tail:
                self.err.write(f"job {short(job.get('id'))} kept no log (it is {job.get('status')})\n")
                return EXIT_OK
            number, text = None, tail
        if self.args.json:
            self.out.json({"id": (job or {}).get("id") or ref, "attempt": number, "log": text})
        else:
            self.out.stream.write(text)
            self.out.stream.flush()
        return EXIT_OK

    def cmd_fetch(self) -> int:
        a = self.args
        job = self.client.job(a.id).get("job") or {}
        job_id, artifact_id = job.get("id") or a.id, job.get("artifact_id")
        if not artifact_id:
            raise errors.NotFound(f"job {short(job_id)} has no artifact yet (it is {job.get('status')}); "
                                  "fetch it once it has completed")
        dest_dir = Path(a.output or ".")
        stem = "_".join(_safe(job.get(k)) for k in ("model", "mode") if job.get(k)) or "job"
        stem = f"{stem}-{artifact_id[:12]}"
        partial = dest_dir / f"{stem}.bundle"
        made_dest_dir = not dest_dir.exists()
        self.client.download_artifact(artifact_id, partial)
        from cis490fleet import bundle

        extracted = None
        try:
            with open(partial, "rb") as f:
                suffix = bundle.bundle_suffix(f.read(4))
            path = dest_dir / f"{stem}{suffix}"
            os.replace(partial, path)
            if a.extract:
                try:
                    bundle.extract_bundle(path, dest_dir / stem, max_bytes=a.max_extract)
                except (bundle.NoZstdDecoder, errors.TooLarge):
                    path.unlink()  # the command failed as a whole: nothing half-done stays
                    if made_dest_dir:
                        dest_dir.rmdir()
                    raise
                extracted = dest_dir / stem
        except OSError as err:
            raise errors.ConfigError(f"cannot save the model under {dest_dir}: {err.strerror or err} "
                                     f"({err.filename or partial}); choose another -o folder") from None
        if a.json:
            self.out.json({"job_id": job_id, "artifact_id": artifact_id, "path": str(path),
                           "extracted": str(extracted) if extracted else None})
        else:
            self.out.line(str(path))
            if extracted:
                self.out.line(str(extracted))
        return EXIT_OK

    # watch -------------------------------------------------------------------------------------

    def cmd_watch(self) -> int:
        try:
            return self._watch()
        except KeyboardInterrupt:
            return EXIT_OK

    def _watch(self) -> int:
        a = self.args
        redraw = self.out.tty and not a.once
        while True:
            try:
                snap = self.snapshot()
                lines = self.watch_lines(snap, time.time(), bars=self.out.tty)
            except errors.FleetError as err:
                if a.once or isinstance(err, (errors.Unauthorized, errors.Forbidden, errors.ConfigError)):
                    raise
                lines = [f"{time.strftime('%H:%M:%S')} {err}"]
            if a.json:
                self.out.json(snap)
            elif redraw:
                self.out.stream.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
            else:
                for line in lines:
                    self.out.line(line)
            self.out.stream.flush()
            if a.once:
                return EXIT_OK
            time.sleep(a.interval)

    def watch_lines(self, snap: dict, now: float, bars: bool) -> list[str]:
        counts = snap["health"].get("jobs") or {}
        paint = self.out.paint
        head = f"{time.strftime('%H:%M:%S', time.localtime(now))}  " + "  ".join(
            f"{paint(s, s)} {counts[s]}" for s in STATUS_ORDER if s in counts)
        live = sum(1 for w in snap["workers"] if w.get("live"))
        lines = [head + f"  workers {live}/{len(snap['workers'])}"]
        columns = terminal_columns(self.out.stream) - 2
        history = {}
        for job in snap["running"]:
            started = job_started(job)
            key = (job.get("id"), started)
            history[key] = observe(self._history.get(key, []), job.get("progress"), now)
            label = f"{short(job.get('id'))} {job.get('model')}/{job.get('mode')} on {job.get('host') or '?'}"
            label += f" ({age(started, now)})" if bars else f" {job.get('status')} age {age(started, now)}"
            lines.append("  " + progress_line(label, job.get("progress"), started, now, tty=bars, columns=columns,
                                              history=history[key]))
        self._history = history
        return lines


def _safe(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(value))[:64]


def new_log_text(old: str, new: str) -> str:
    """What ``new`` adds after ``old``, both tails of one growing log (the start of ``new`` may cut a line)."""
    if not old:
        return new
    if new.startswith(old):
        return new[len(old):]
    old_lines, new_lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
    for i in range(max(0, len(old_lines) - len(new_lines)), len(old_lines)):
        overlap = old_lines[i:]
        if overlap[0].endswith(new_lines[0]) and new_lines[1:len(overlap)] == overlap[1:]:
            return "".join(new_lines[len(overlap):])
    return new


# -- arguments --------------------------------------------------------------------------------------


def _result_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else str(value)


JOB_REF_HELP = "a job's name in the manifest, its id, or a unique prefix of the id (4+ hex digits)"


def _add_common(p: argparse.ArgumentParser, top: bool) -> None:
    """The global options, accepted before and after the subcommand."""
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--receiver", action="append", default=d([]), metavar="URL",
                   help=f"a coordinator peer's URL; repeat for several (default: ${ENV_RECEIVER}, comma-separated)")
    p.add_argument("--ca", default=d(None), metavar="PEM", help="CA that signed the coordinator's certificate")
    p.add_argument("--cert", default=d(None), metavar="PEM", help="client certificate (mutual TLS)")
    p.add_argument("--key", default=d(None), metavar="PEM", help="the client certificate's private key")
    p.add_argument("--json", action="store_true", default=d(False), help="print the server's JSON")
    p.add_argument("--no-color", action="store_true", default=d(False), help="never colour the output")
    p.add_argument("--timeout", type=float, default=d(30.0), metavar="S", help="seconds to wait for an answer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cis490fleet jobs", description="Look at and steer the fleet's training jobs.",
        epilog="The operator token for cancel, requeue and reload comes from $CIS490_OPERATOR_TOKEN. "
               "Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 not authorised, 5 coordinator unreachable.")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _add_common(p, top=False)
        return p

    add("status", "counts by status, live workers, running jobs")
    p = add("list", "list jobs")
    p.add_argument("--status", help="only jobs in this status (comma-separated for several)")
    p.add_argument("--model", help="only jobs of this model")
    p.add_argument("--host", help="only jobs held by this host")
    p.add_argument("--limit", type=_positive_int, help="at most this many jobs")
    p.add_argument("--offset", type=_non_negative_int, default=0, help="skip this many jobs")
    p = add("show", "one job: spec, attempts, last error, why pending, log tail")
    p.add_argument("id", help=JOB_REF_HELP)
    p = add("failures", "the newest failed or stale attempts, also of jobs still retrying or since completed")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="at most this many attempts (default 20)")
    p = add("results", "completed jobs with their hyper values and final metrics, best first")
    p.add_argument("--sweep", metavar="NAME", help="only this sweep's jobs (its name, else sweeps[<index>])")
    p.add_argument("--model", metavar="M", help="only this model's jobs")
    p.add_argument("--sort", metavar="METRIC", help="rank by this metric (default: val_loss, else a val_ metric)")
    p.add_argument("--order", choices=("min", "max"), help="which way is better (default: from the metric's name)")
    p.add_argument("--csv", action="store_true", help="print CSV for a spreadsheet")
    p = add("cancel", "cancel jobs (a running job's worker is told to stop)")
    p.add_argument("ids", nargs="+", metavar="ID", help=JOB_REF_HELP)
    p = add("requeue", "put failed or cancelled jobs back in the queue")
    p.add_argument("ids", nargs="+", metavar="ID", help=JOB_REF_HELP)
    p = add("submit", "add jobs without editing the manifest: a TOML file of [[jobs]]/[[sweeps]], or flags")
    p.add_argument("file", nargs="?", metavar="FILE", help="TOML with [[jobs]] and [[sweeps]] tables; - reads stdin")
    p.add_argument("--model", help="one job (or a sweep) of this model")
    p.add_argument("--mode", help="its mode")
    p.add_argument("--name", help="its name (a sweep's: the prefix of its jobs' names)")
    p.add_argument("--seed", type=int, help="its seed")
    p.add_argument("--hyper", action="append", default=[], metavar="KEY=VALUE", help="a hyper value; repeat")
    p.add_argument("--sweep", action="append", default=[], metavar="hyper.KEY=V1,V2",
                   help="alternatives to train (a sweep over their cross product); repeat")
    p.add_argument("--dry-run", action="store_true", help="print the ids it would add, add nothing")
    p = add("reload", "put a training manifest in force: FILE from here, else the coordinator's own --manifest")
    p.add_argument("file", nargs="?", metavar="FILE", help="manifest (TOML) to send; default: the file the "
                   "receiving coordinator was started with")
    from cis490fleet import hosts_cmd

    hosts_cmd.add_parser(add)
    add("workers", "workers, when they were last seen, what they run")
    p = add("logs", "a job's log: the live tail while it runs, the whole log an attempt handed in once it ended")
    p.add_argument("id", help=JOB_REF_HELP)
    p.add_argument("--attempt", type=_positive_int, metavar="N", help="the whole log of attempt N (jobs show lists them)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    p.add_argument("--interval", type=_positive_float, default=2.0, metavar="S", help="seconds between polls")
    p = add("fetch", "download a job's artifact and verify its sha256")
    p.add_argument("id", help=JOB_REF_HELP)
    p.add_argument("-o", "--output", metavar="DIR", help="folder to write into (default: the current one)")
    p.add_argument("--extract", action="store_true", help="also extract the bundle next to it")
    p.add_argument("--max-extract", type=_byte_size, metavar="SIZE",
                   help="refuse to extract past this many bytes (e.g. 10G; default 200x the bundle's size, "
                        "at least 1 GiB, at most 64 GiB)")
    p = add("watch", "a refreshing view of the queue and running jobs")
    p.add_argument("--interval", type=_positive_float, default=2.0, metavar="S", help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="draw once and exit")
    p = add("peers", "health of each coordinator peer: role, voter or learner, term, leader, commit, applied, lag; "
            "or change the group: add ID=URL, remove ID, replace OLD NEW=URL")
    p.add_argument("change", nargs="?", choices=("add", "remove", "replace"),
                   help="add a peer (a learner until it has caught up), remove one, or replace a dead one")
    p.add_argument("peer_args", nargs="*", metavar="PEER", help="ID=URL for add; ID for remove; OLD NEW=URL for replace")
    parser.subcommands = list(sub.choices)  # what `cis490fleet --help` lists
    return parser


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.I)


def _byte_size(text: str) -> int:
    """``10G``, ``512M``, ``4096``: binary multiples, in bytes (at least 1)."""
    found = _SIZE_RE.match(text)
    if not found:
        raise argparse.ArgumentTypeError(f"expected a size such as 10G, 512M or 4096, got {text!r}")
    value = int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2).upper() or " "))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 byte, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def json_error(code: str, detail: str, exit_: int) -> str:
    """An error as ``--json`` reports it: one JSON object on stderr, so stdout carries only answers."""
    return json.dumps({"error": code, "detail": detail, "exit": exit_}, sort_keys=True) + "\n"


def main(argv: list[str] | None = None, *, stdout=None, stderr=None) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_json = "--json" in argv and not {"-h", "--help"} & set(argv)
    try:
        if wants_json:
            import contextlib

            with contextlib.redirect_stderr(io.StringIO()) as said:
                args = build_parser().parse_args(argv)
        else:
            args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return EXIT_OK
        if wants_json:
            lines = said.getvalue().strip().splitlines()
            stderr.write(json_error("usage", lines[-1] if lines else "bad usage; see --help", EXIT_USAGE))
        return EXIT_USAGE
    ops = Ops(args, Out(stdout, color=False if args.no_color else None), stderr)
    try:
        return getattr(ops, "cmd_" + args.command)()
    except BrokenPipeError:
        return EXIT_OK
    except errors.FleetError as err:
        log.debug("jobs %s failed", args.command, exc_info=True)
        ops.complain(err)
        return exit_code(err)
    finally:
        if ops._client is not None:
            ops._client.close()
