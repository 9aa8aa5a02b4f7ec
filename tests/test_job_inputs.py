"""Inputs from earlier jobs: a job's trainer gets the verified, extracted bundles of the jobs it is ``after``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cis490fleet import bundle, manifest, slots
from cis490fleet.errors import ManifestError
from cis490fleet.slots import Slot
from cis490fleet.trainer_process import TrainerRun
from test_trainer import env_for, needs_torch, train
from test_worker import TRAINERS, cpu_host, make_worker, only_job  # noqa: F401 (cpu_host is a fixture)


def chain_manifest(command: list[str]) -> str:
    return f"""
[fleet]
heartbeat_s = 0.5
stale_after_s = 2.0
max_attempts = 1

[trainer]
command = {json.dumps(command)}

[[jobs]]
name = "base"
model = "mlp"
mode = "baseline"

[[jobs]]
name = "tuned"
model = "mlp"
mode = "finetune"
after = ["base"]
"""


def fetch_bundle(server, artifact_id: str, dest):
    status, _, data = server.call("GET", f"/v1/artifact/{artifact_id}")
    assert status == 200
    path = dest.with_suffix(bundle.bundle_suffix(data[:4]))
    path.write_bytes(data)
    return bundle.extract_bundle(path, dest)


def test_a_dependent_job_gets_its_parents_bundle(live_server, tmp_path, cpu_host):
    server = live_server(chain_manifest(["{python}", str(TRAINERS / "child.py"), "--mode", "{mode}", "--seed",
                                         "{seed}", "--out", "{out}", "--inputs", "{inputs}"]))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == slots.COMPLETED  # base
    assert w.run_once() == slots.COMPLETED  # tuned, after base
    status, _, body = server.call("GET", "/v1/jobs?status=completed")
    tuned = next(j for j in body["jobs"] if j["name"] == "tuned")
    seen = json.loads((fetch_bundle(server, tuned["artifact_id"], tmp_path / "tuned") / "seen.json").read_text())
    assert seen["inputs"] == {"base": {"from": "base", "seed": "0"}}
    assert seen["folder"].endswith("/inputs")


def test_input_placeholders_name_each_inputs_folder(tmp_path):
    run = TrainerRun({"job_id": "ab" * 32, "job": {"model": "mlp", "mode": "finetune"},
                      "trainer": {"command": ["t", "--from", "{input.base}", "--all", "{inputs}", "{x}"]}},
                     Slot(0, ""), tmp_path, 0.0)
    run.inputs = {"base": tmp_path / "i" / "base"}
    assert run.command() == ["t", "--from", str(tmp_path / "i" / "base"), "--all", str(run.dir / "inputs"), "{x}"]


def test_a_command_naming_an_input_the_job_lacks_fails_it_without_a_retry(live_server, tmp_path, cpu_host):
    text = chain_manifest(["{python}", str(TRAINERS / "child.py"), "--out", "{out}", "--parent", "{input.bse}"])
    server = live_server(text.replace('after = ["base"]\n', ""))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == slots.FAILED
    status, _, body = server.call("GET", "/v1/jobs?status=failed")
    (failed,) = [j for j in body["jobs"] if j["name"] == "base"]
    assert "uses {input.bse} but job" in failed["last_error"] and "has no input 'bse'" in failed["last_error"]


def test_input_placeholders_pass_the_manifest_check_and_typos_do_not():
    manifest.parse(chain_manifest(["{python}", "t.py", "--from", "{input.base}", "--all", "{inputs}"]), "m.toml")
    with pytest.raises(ManifestError, match=r"unknown placeholder \{inptu.base\}"):
        manifest.parse(chain_manifest(["{python}", "t.py", "--from", "{inptu.base}"]), "m.toml")


@needs_torch
def test_finetune_starts_from_the_parents_weights(tmp_path):
    parent = tmp_path / "inputs" / "base"
    proc = train(tmp_path, "mlp", {"epochs": 2, "hidden": 8}, parent)
    assert proc.returncode == 0, proc.stderr
    argv = [sys.executable, "-m", "cis490fleet", "train", "--model", "mlp", "--mode", "finetune", "--hyper",
            json.dumps({"epochs": 1, "hidden": 8, "lr": 1e-12}), "--seed", "3", "--out", str(tmp_path / "tuned")]
    env = env_for(tmp_path, CIS490_INPUTS=str(tmp_path / "inputs"))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr
    check = ("import sys, torch\na, b = (torch.load(p, weights_only=True) for p in sys.argv[1:])\n"
             "print(max(float((a[k] - b[k]).abs().max()) for k in a))\n")
    diff = subprocess.run([sys.executable, "-W", "ignore", "-c", check, str(parent / "model.pt"),
                           str(tmp_path / "tuned" / "model.pt")], capture_output=True, text=True, timeout=120)
    assert float(diff.stdout) < 1e-6, diff.stderr  # lr 1e-12: the weights are the parent's

    fresh = subprocess.run([*argv[:-1], str(tmp_path / "fresh")], env=env_for(tmp_path), capture_output=True,
                           text=True, cwd=tmp_path, timeout=240)
    assert fresh.returncode == 2 and "--mode finetune starts from the one job" in fresh.stderr
    wrong = subprocess.run([*argv[:9], json.dumps({"epochs": 1, "hidden": 16}), "--seed", "3", "--out",
                            str(tmp_path / "wrong")], env=env, capture_output=True, text=True, cwd=tmp_path,
                           timeout=240)
    assert wrong.returncode == 2 and "same hidden size" in wrong.stderr, wrong.stderr
