"""The Quickstart demo on three coordinator peers (`python3 make.py demo --peers 3`), end to end.

A real run of scripts/demo.py: three `serve` peers sharing a cluster key, two hosts enrolled with
`jobs hosts add`, two workers signing with those keys and naming every peer, the whole demo manifest
trained. With `--keep` the peers stay up after the results table, so the test reads each peer's own
queue file and asks each peer, as a stranger would, to trust a host it cannot prove.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env, http_call, signed, wait_for
from peer_harness import read_queue_state
from test_worker import fake_nvidia_smi

ROOT = Path(__file__).resolve().parent.parent
DEMO_JOBS = ["gbt-small", "iris-logreg", "logreg-base", "logreg-l2", "mlp-finetune", "mlp-holdout", "mlp-resume",
             "mlp-small", "mlp-wide"]
CAPABILITY = {"os": "linux", "cores": 2, "ram_gib": 4.0, "cuda": False, "gpus": [], "slots": 1}
pytestmark = pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals")


def job_names(data: Path) -> dict[str, str]:
    import sqlite3

    conn = sqlite3.connect(f"file:{data / 'queue.sqlite3'}?mode=ro", uri=True)
    try:
        return {row[0]: row[1] for row in conn.execute("SELECT id, name FROM jobs")}
    finally:
        conn.close()


def test_the_demo_on_three_peers_trains_every_job_once_with_signed_workers(tmp_path):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    env = clean_env()
    env.update(PATH=fake_nvidia_smi(tmp_path, []), PYTHONUNBUFFERED="1")
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), "--peers", "3", "--keep",
                                 "--run-dir", str(run), "--pyz", str(tmp_path / "demo.pyz"), "--timeout", "240"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("the demo's results with the peers kept running",
                 lambda: "Ctrl-C stops it" in log.read_text() or demo.poll() is not None, timeout=300, every=0.5)
        text = log.read_text()
        assert demo.poll() is None, text

        # Three peers, one data folder each, agreeing on one log.
        urls = re.search(r"3 coordinator peers at (\S+), (\S+), (\S+) ", text).groups()
        header, *peers_table = text.split("(jobs peers):\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert header.split()[:5] == ["URL", "ROLE", "TERM", "LEADER", "NODE"], text
        assert sorted(line.split()[4] for line in peers_table) == ["a", "b", "c"], text
        assert sum(line.split()[1] == "leader" for line in peers_table) == 1, text
        states = {nid: read_queue_state(run / f"data-{nid}" / "queue.sqlite3") for nid in "abc"}
        assert states["a"] == states["b"] == states["c"], states

        # Every demo job completed, each by exactly one accepted attempt; only mlp-resume, whose worker the demo
        # kills, has a second attempt, and that one resumed from the checkpoint the first left.
        names = job_names(run / "data-a")
        assert sorted(names.values()) == DEMO_JOBS
        jobs, attempts = states["a"]["jobs"], states["a"]["attempts"]
        for job_id, name in names.items():
            assert jobs[job_id][0] == "completed", (name, jobs[job_id], attempts[job_id])
            outcomes = [a[-1] for a in attempts[job_id]]
            assert outcomes.count("completed") == 1, (name, attempts[job_id])
            assert len(outcomes) == (2 if name == "mlp-resume" else 1), (name, attempts[job_id])
        assert "mlp-resume was resumed by" in text and "not a fresh start" in text, text
        results = text.split("demo: results, best first (jobs results):", 1)[1].splitlines()[2:11]
        assert sorted(line.split()[0] for line in results) == DEMO_JOBS, text
        models = run / "models"
        assert sorted(p.name for p in models.iterdir()) == DEMO_JOBS
        assert len(list(models.glob("*/*/model.pt"))) == 9

        # The workers proved who they were with keys from `jobs hosts add`, kept where only this user reads.
        key = bytes.fromhex((run / "demo-a.key").read_text().strip())
        for host in ("demo-a", "demo-b"):
            assert stat.S_IMODE((run / f"{host}.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((run / "cluster.key").stat().st_mode) == 0o600
        for url in urls:
            status, _, health = http_call(url, "GET", "/v1/health", credentials=False)
            assert status == 200 and health["security"] == {"workers": "signed", "reads": "token"}, (url, health)
            status, _, body = http_call(url, "POST", "/v1/job/claim", CAPABILITY, {"x-lab-host": "demo-a"},
                                        credentials=False)
            assert status == 401 and "--host-key-file" in body["detail"], (url, status, body)
            wrong = signed(secrets.token_bytes(32), "demo-a", "POST", "/v1/job/claim", CAPABILITY,
                           {"x-lab-host": "demo-a"})
            status, _, body = http_call(url, "POST", "/v1/job/claim", *wrong, credentials=False)
            assert status == 401 and "signature does not match" in body["detail"], (url, status, body)
            right = signed(key, "demo-a", "POST", "/v1/job/claim", CAPABILITY, {"x-lab-host": "demo-a"})
            status, _, body = http_call(url, "POST", "/v1/job/claim", *right, credentials=False)
            assert status in (200, 204) and not (body or {}).get("job_id"), (url, status, body)
        assert read_queue_state(run / "data-a" / "queue.sqlite3")["attempts"] == attempts

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0, log.read_text()
    finally:
        if demo.poll() is None:  # a failed check: Ctrl-C stops what the demo started, SIGKILL would orphan it
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
