"""The built-in trainer on several GPUs: DistributedDataParallel, here over gloo CPU processes standing in
for the GPUs (the worker sets CIS490_GPUS to how many GPUs the job got)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_trainer import env_for, needs_torch, progress_rows, train_argv

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")


@needs_torch
def test_two_processes_train_one_model_with_ddp_and_rank_0_saves_it(tmp_path):
    out = tmp_path / "out"
    hyper = {"epochs": 2, "hidden": 8, "batch_size": 64}
    proc = subprocess.run(train_argv("mlp", hyper, out), env=env_for(tmp_path, CIS490_GPUS="2"),
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "DistributedDataParallel over 2 processes (gloo on the CPU)" in proc.stdout
    # One progress line per epoch: only rank 0 reports.
    assert [r["epoch"] for r in progress_rows(tmp_path)] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_done"] == 2 and metrics["interrupted"] is False
    assert "world=2" in (out / "train.log").read_text()
    check = ("import sys, torch; s = torch.load(sys.argv[1], weights_only=True); "
             "print(sorted((k, tuple(v.shape)) for k, v in s.items()))")
    loaded = subprocess.run([sys.executable, "-W", "ignore", "-c", check, str(out / "model.pt")],
                            capture_output=True, text=True, timeout=120)
    assert loaded.stdout.strip() == "[('0.bias', (8,)), ('0.weight', (8, 8)), ('2.bias', (2,)), ('2.weight', (2, 8))]"


@needs_torch
def test_sigterm_stops_every_rank_and_rank_0_saves_what_there_is(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(train_argv("logreg", {"epochs": 1_000_000}, out), env=env_for(tmp_path, CIS490_GPUS="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    try:
        for _ in range(1200):
            if progress_rows(tmp_path) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert progress_rows(tmp_path), "the trainer never reported progress"
        os.killpg(proc.pid, signal.SIGTERM)  # as the worker does: the whole process group
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["epochs_done"] >= 1
