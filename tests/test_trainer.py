"""The example trainer keeps the trainer contract; so do the fixture trainers in tests/trainers/."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "trainers"
HAS_TORCH = importlib.util.find_spec("torch") is not None


def needs_torch(test):
    return pytest.mark.torch(pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")(test))


def env_for(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CIS490_PROGRESS=str(tmp_path / "progress.jsonl"),
               CIS490_JOB_ID="ab" * 32, CIS490_ATTEMPT="1", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def train_argv(model: str, hyper: dict, out: Path, seed: int = 7, recipe: str = "default") -> list[str]:
    return [sys.executable, "-m", "cis490fleet", "train", "--model", model, "--mode", "baseline",
            "--hyper", json.dumps(hyper), "--seed", str(seed), "--split-recipe", recipe, "--out", str(out)]


def train(tmp_path: Path, model: str, hyper: dict, out: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(train_argv(model, hyper, out, **kw), env=env_for(tmp_path), capture_output=True, text=True,
                          cwd=tmp_path, timeout=240)


def progress_rows(tmp_path: Path) -> list[dict]:
    path = tmp_path / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_describe_lists_hyper_keys_without_importing_torch(tmp_path):
    code = ("import json, sys\nfrom cis490fleet import trainer\nrc = trainer.main(['--describe'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env_for(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"gbt": ["bins", "data", "l2", "lr", "max_depth", "min_leaf", "trees"],
                                       "logreg": ["batch_size", "data", "epochs", "lr", "weight_decay"],
                                       "mlp": ["batch_size", "data", "epochs", "hidden", "lr", "weight_decay"]}
    via_cli = subprocess.run([sys.executable, "-m", "cis490fleet", "train", "--describe"], env=env_for(tmp_path),
                             capture_output=True, text=True, timeout=60)
    assert via_cli.returncode == 0 and json.loads(via_cli.stdout) == json.loads(proc.stdout)


@pytest.mark.parametrize("hyper,recipe,message", [
    ({"lrr": 0.1}, "default", "unknown hyper key(s) 'lrr' for model mlp; accepted: batch_size, epochs, hidden, lr"),
    ({"epochs": 0}, "default", "hyper epochs must be a whole number >= 1, got 0"),
    ({"lr": "fast"}, "default", 'hyper lr must be a number > 0, got "fast"'),
    ({"hidden": True}, "default", "hyper hidden must be a whole number >= 1, got true"),
    ({"max_depth": 13}, "default", "hyper max_depth must be a whole number from 1 to 12, got 13"),
    ({"bins": 2.5}, "default", "hyper bins must be a whole number from 1 to 256, got 2.5"),
    ({}, "holdout-95", "unknown split recipe 'holdout-95'"),
    ([1], "default", "--hyper must be a JSON object"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, hyper, recipe, message):
    model = "gbt" if {"max_depth", "bins"} & set(hyper if isinstance(hyper, dict) else ()) else "mlp"
    proc = train(tmp_path, model, hyper, tmp_path / "out", recipe=recipe)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_hyper_that_is_not_json(tmp_path):
    argv = train_argv("mlp", {}, tmp_path / "out")
    argv[argv.index("--hyper") + 1] = "{lr: 1}"
    proc = subprocess.run(argv, env=env_for(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--hyper is not valid JSON" in proc.stderr


def test_out_defaults_to_the_environment(tmp_path, monkeypatch):
    from cis490fleet import trainer

    monkeypatch.setenv("CIS490_OUT", str(tmp_path / "from-env"))
    assert trainer.parse_args(["--model", "logreg"]).out == tmp_path / "from-env"
    monkeypatch.delenv("CIS490_OUT")
    with pytest.raises(trainer.UsageError, match="pass --out DIR or set CIS490_OUT"):
        trainer.parse_args(["--model", "logreg"])


def test_dataset_depends_on_seed_and_recipe_only():
    from cis490fleet import trainer

    a = trainer.make_dataset(3, 0.2)
    assert a == trainer.make_dataset(3, 0.2)
    assert a != trainer.make_dataset(4, 0.2)
    assert len(a[2]) == round(trainer.SAMPLES * 0.2) and len(trainer.make_dataset(3, 0.0)[2]) == 0
    assert set(a[1]) == {0, 1}


@needs_torch
def test_mlp_trains_reports_progress_and_is_bit_identical(tmp_path):
    hyper = {"epochs": 4, "hidden": 16}
    first = train(tmp_path, "mlp", hyper, tmp_path / "run1")
    assert first.returncode == 0, first.stderr
    rows = progress_rows(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["fraction"] == 1.0 and rows[-1]["epochs"] == 4
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows) and rows[0]["step"] > 0
    assert set(rows[0]) == {"step", "epoch", "epochs", "loss", "metrics", "fraction"}
    assert set(rows[0]["metrics"]) == {"val_accuracy", "val_loss"}
    metrics = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert metrics["epochs_done"] == 4 and metrics["interrupted"] is False and metrics["device"] == "cpu"
    assert metrics["hyper"] == {"lr": 0.05, "epochs": 4, "hidden": 16, "batch_size": 32, "weight_decay": 0.0}
    assert 0.5 < metrics["val_accuracy"] <= 1.0

    second = train(tmp_path, "mlp", hyper, tmp_path / "run2")
    assert second.returncode == 0, second.stderr
    names = sorted(p.name for p in (tmp_path / "run1").iterdir())
    assert names == ["metrics.json", "model.pt", "train.log"]
    assert names == sorted(p.name for p in (tmp_path / "run2").iterdir())
    for name in names:
        assert (tmp_path / "run1" / name).read_bytes() == (tmp_path / "run2" / name).read_bytes(), name

    other_seed = train(tmp_path, "mlp", hyper, tmp_path / "run3", seed=8)
    assert other_seed.returncode == 0
    assert (tmp_path / "run3" / "model.pt").read_bytes() != (tmp_path / "run1" / "model.pt").read_bytes()


@needs_torch
def test_logreg_trains_and_saves_a_loadable_state_dict(tmp_path):
    proc = train(tmp_path, "logreg", {"epochs": 3, "lr": 0.2}, tmp_path / "out", recipe="holdout-30")
    assert proc.returncode == 0, proc.stderr
    assert len(progress_rows(tmp_path)) == 3
    check = ("import sys, torch\nsd = torch.load(sys.argv[1], weights_only=True)\n"
             "assert sorted(sd) == ['bias', 'weight'], sorted(sd)\nassert tuple(sd['weight'].shape) == (2, 8)\n")
    loaded = subprocess.run([sys.executable, "-W", "ignore", "-c", check, str(tmp_path / "out" / "model.pt")],
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    log = (tmp_path / "out" / "train.log").read_text()
    assert "train logreg mode=baseline seed=7 split=holdout-30" in log and "epoch 3/3" in log
    assert "train=358 val=154" in log


@needs_torch
def test_gbt_trains_boosted_trees_that_the_saved_model_reproduces(tmp_path):
    hyper = {"trees": 12, "max_depth": 3}
    first = train(tmp_path, "gbt", hyper, tmp_path / "run1", seed=3)
    assert first.returncode == 0, first.stderr
    rows = progress_rows(tmp_path)
    assert [r["epoch"] for r in rows] == list(range(1, 13)) and rows[-1]["fraction"] == 1.0
    assert rows[-1]["loss"] < rows[0]["loss"], "boosting did not lower the training loss"
    metrics = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert metrics["epochs"] == 12 and metrics["epochs_done"] == 12 and metrics["interrupted"] is False
    assert metrics["hyper"] == {"lr": 0.3, "trees": 12, "max_depth": 3, "min_leaf": 5, "bins": 32, "l2": 1.0}
    assert metrics["val_accuracy"] > 0.65, "the synthetic problem is learnable; chance is about 0.5"

    # The saved trees alone give back the figures reported during training.
    check = ("import json, sys, torch\nfrom cis490fleet import trainer\n"
             "model = torch.load(sys.argv[1], weights_only=True)\n"
             "assert model['feature'].shape == (12, 7) and model['leaf'].shape == (12, 8), model['leaf'].shape\n"
             "x_train, y_train, x_val, y_val = trainer.make_dataset(3, 0.2)\n"
             "x, y = torch.tensor(x_train), torch.tensor(y_train)\n"
             "raw = trainer.predict_gbt(torch, model, x)\n"
             "loss = torch.nn.functional.binary_cross_entropy_with_logits(raw, y.float()).item()\n"
             "val = trainer._evaluate_gbt(torch, model, torch.tensor(x_val), torch.tensor(y_val), 'val')\n"
             "print(json.dumps({'train_loss': loss, **val}))\n")
    again = subprocess.run([sys.executable, "-W", "ignore", "-c", check, str(tmp_path / "run1" / "model.pt")],
                           env=env_for(tmp_path), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    figures = json.loads(again.stdout)
    assert figures["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-5)
    assert figures["val_accuracy"] == metrics["val_accuracy"]
    assert figures["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)

    second = train(tmp_path, "gbt", hyper, tmp_path / "run2", seed=3)
    assert second.returncode == 0, second.stderr
    for name in ("metrics.json", "model.pt", "train.log"):
        assert (tmp_path / "run1" / name).read_bytes() == (tmp_path / "run2" / name).read_bytes(), name
    deeper = train(tmp_path, "gbt", {**hyper, "max_depth": 4}, tmp_path / "run3", seed=3)
    assert deeper.returncode == 0
    assert (tmp_path / "run3" / "model.pt").read_bytes() != (tmp_path / "run1" / "model.pt").read_bytes()


@needs_torch
def test_gbt_without_l2_leaves_unreached_leaves_at_zero_not_nan(tmp_path):
    proc = train(tmp_path, "gbt", {"l2": 0, "max_depth": 7, "min_leaf": 1, "trees": 2}, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    check = ("import sys, torch\nm = torch.load(sys.argv[1], weights_only=True)\n"
             "assert not torch.isnan(m['leaf']).any(), 'NaN leaves'\nassert (m['leaf'] == 0).any()\n")
    loaded = subprocess.run([sys.executable, "-W", "ignore", "-c", check, str(tmp_path / "out" / "model.pt")],
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr


@needs_torch
@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("model,hyper", [("mlp", {"epochs": 1_000_000}), ("gbt", {"trees": 1_000_000})])
def test_sigterm_saves_what_it_has_and_exits_non_zero(tmp_path, model, hyper):
    out = tmp_path / "out"
    proc = subprocess.Popen(train_argv(model, hyper, out), env=env_for(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for _ in range(1200):
            if progress_rows(tmp_path) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert progress_rows(tmp_path), "the trainer never reported progress"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True and 1 <= metrics["epochs_done"] < 1_000_000
    assert (out / "model.pt").stat().st_size > 0
    assert "stopped by SIGTERM" in stdout


# Fixture trainers: tiny stdlib scripts the worker's tests run as real subprocesses.

def fixture(tmp_path: Path, name: str, hyper: dict | None = None, **popen) -> subprocess.Popen:
    argv = [sys.executable, str(FIXTURES / name), "--model", "mlp", "--mode", "m", "--hyper", json.dumps(hyper or {}),
            "--seed", "1", "--split-recipe", "default", "--out", str(tmp_path / "out")]
    return subprocess.Popen(argv, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def test_fixture_ok(tmp_path):
    stdout, _ = (p := fixture(tmp_path, "ok.py")).communicate(timeout=60)
    assert p.returncode == 0 and "ok: trained mlp" in stdout
    assert json.loads((tmp_path / "out" / "result.json").read_text())["model"] == "mlp"
    assert [r["step"] for r in progress_rows(tmp_path)] == [1, 2, 3]


def test_fixture_crash(tmp_path):
    _, stderr = (p := fixture(tmp_path, "crash.py")).communicate(timeout=60)
    assert p.returncode == 3 and stderr.startswith("boom: ")
    assert len(progress_rows(tmp_path)) == 1


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_fixture_hang_dies_on_sigterm(tmp_path):
    p = fixture(tmp_path, "hang.py")
    try:
        assert p.stdout.readline().startswith("hanging, pid")
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == -signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_fixture_slow(tmp_path):
    stdout, _ = (p := fixture(tmp_path, "slow.py", {"steps": 3, "sleep": 0.01})).communicate(timeout=60)
    assert p.returncode == 0 and stdout.splitlines() == ["step 1/3", "step 2/3", "step 3/3"]
    assert [r["fraction"] for r in progress_rows(tmp_path)][-1] == 1.0


def test_fixture_noisy(tmp_path):
    stdout, stderr = (p := fixture(tmp_path, "noisy.py", {"lines": 5000})).communicate(timeout=60)
    assert p.returncode == 0
    assert len(stdout.splitlines()) == 5001 and len(stderr.splitlines()) == 5000
    assert (tmp_path / "out" / "result.json").exists()


# Checkpoints: a run stopped at any point and resumed ends with the same output bytes as one that never stopped.

def _killed_after_one_more_epoch(tmp_path: Path, model: str, hyper: dict, ckpt: Path, resume: Path | None) -> None:
    """Train with the progress file a FIFO nobody reads: after its next epoch the trainer writes a checkpoint,
    then blocks opening the FIFO (a writer waits for a reader), and is killed there with SIGKILL."""
    fifo = tmp_path / f"progress-{ckpt.name}.fifo"
    os.mkfifo(fifo)
    env = env_for(tmp_path, CIS490_PROGRESS=str(fifo), CIS490_CHECKPOINT_DIR=str(ckpt),
                  **({"CIS490_RESUME_FROM": str(resume)} if resume else {}))
    proc = subprocess.Popen(train_argv(model, hyper, tmp_path / f"out-{ckpt.name}"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not (ckpt / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint.pt"], "a temporary file was left behind"


RESUMABLE = [("mlp", {"epochs": 6, "hidden": 8}), ("logreg", {"epochs": 6}),
             ("gbt", {"trees": 6, "max_depth": 2})]


@needs_torch
@pytest.mark.skipif(os.name == "nt", reason="POSIX FIFO and signals")
@pytest.mark.parametrize("model,hyper", RESUMABLE)
def test_kill_9_after_a_checkpoint_then_resume_gives_the_same_bytes(tmp_path, model, hyper):
    whole = train(tmp_path, model, hyper, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    # Killed after epoch 1, resumed and killed after epoch 2, then resumed to the end.
    _killed_after_one_more_epoch(tmp_path, model, hyper, tmp_path / "ckpt1", None)
    _killed_after_one_more_epoch(tmp_path, model, hyper, tmp_path / "ckpt2", tmp_path / "ckpt1")
    ckpt = tmp_path / "ckpt2"
    resumed = subprocess.run(train_argv(model, hyper, tmp_path / "resumed"), capture_output=True, text=True,
                             env=env_for(tmp_path, CIS490_RESUME_FROM=str(ckpt)), cwd=tmp_path, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    epochs = hyper.get("epochs") or hyper["trees"]
    done = int(resumed.stdout.split("resuming from the checkpoint in ")[1].split(" after ")[1].split()[0])
    assert done == 2, resumed.stdout
    assert "epoch 2/" not in resumed.stdout and f"epoch 3/{epochs}" in resumed.stdout
    for name in ("model.pt", "metrics.json", "train.log"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@needs_torch
@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigterm_mid_epoch_checkpoints_where_it_stopped_and_resumes_to_the_same_bytes(tmp_path):
    hyper = {"epochs": 3, "batch_size": 1, "hidden": 8}
    whole = train(tmp_path, "mlp", hyper, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(train_argv("mlp", hyper, tmp_path / "first"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=env_for(tmp_path, CIS490_CHECKPOINT_DIR=str(ckpt)))
    try:
        assert proc.stdout.readline().startswith("train mlp")  # torch is loaded: training has begun
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, stderr
    rows = progress_rows(tmp_path)
    assert rows[-1]["checkpoint"] == "checkpoint.pt" and rows[-1]["epoch"] < 3, rows[-1]
    check = ("import sys, torch\nc = torch.load(sys.argv[1], weights_only=True)\n"
             "assert c['fit']['position'] is not None, 'not stopped inside an epoch'\n")
    inside = subprocess.run([sys.executable, "-W", "ignore", "-c", check, str(ckpt / "checkpoint.pt")],
                            capture_output=True, text=True, timeout=120)
    assert inside.returncode == 0, inside.stderr

    resumed = subprocess.run(train_argv("mlp", hyper, tmp_path / "resumed"), capture_output=True, text=True,
                             env=env_for(tmp_path, CIS490_RESUME_FROM=str(ckpt)), cwd=tmp_path, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint" in resumed.stdout
    for name in ("model.pt", "metrics.json", "train.log"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@needs_torch
@pytest.mark.parametrize("content,why", [(b"not a checkpoint", "cannot read the checkpoint"),
                                         (None, "belongs to another job")])
def test_an_unusable_checkpoint_starts_from_the_beginning_and_says_why(tmp_path, content, why):
    hyper = {"epochs": 2, "hidden": 8}
    resume = tmp_path / "resume"
    if content is None:  # a real checkpoint, of another seed
        other = train_argv("mlp", hyper, tmp_path / "other", seed=99)
        done = subprocess.run(other, env=env_for(tmp_path, CIS490_CHECKPOINT_DIR=str(resume)), capture_output=True,
                              cwd=tmp_path, timeout=240)
        assert done.returncode == 0
    else:
        resume.mkdir()
        (resume / "checkpoint.pt").write_bytes(content)
    whole = train(tmp_path, "mlp", hyper, tmp_path / "whole")
    again = subprocess.run(train_argv("mlp", hyper, tmp_path / "again"), capture_output=True, text=True,
                           env=env_for(tmp_path, CIS490_RESUME_FROM=str(resume)), cwd=tmp_path, timeout=240)
    assert again.returncode == 0 and whole.returncode == 0, again.stderr
    assert why in again.stderr and "starting from the beginning" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "again" / "model.pt").read_bytes() == (tmp_path / "whole" / "model.pt").read_bytes()


# -- a real table instead of the synthetic set (--data, hyper data) ------------------------------------


def test_the_shipped_iris_table_is_the_documented_one():
    from cis490fleet import trainer

    xs, labels = trainer.load_table("package:iris.csv")
    assert len(xs) == 150 and all(len(x) == 4 for x in xs)
    assert {name: labels.count(name) for name in set(labels)} == {"setosa": 50, "versicolor": 50, "virginica": 50}
    readme = (ROOT / "cis490fleet" / "data" / "README.md").read_text(encoding="utf-8")
    assert "## iris.csv" in readme and "Fisher" in readme and "Licence: public domain" in readme


def test_a_table_is_split_by_the_recipe_and_seed_and_scaled_by_the_training_rows(tmp_path):
    from cis490fleet import trainer

    job = trainer.parse_args(["--model", "mlp", "--hyper", '{"data": "package:iris.csv"}', "--seed", "3",
                              "--split-recipe", "holdout-30", "--out", str(tmp_path)])
    x_train, y_train, x_val, y_val, classes = trainer.load_dataset(job)
    assert (len(x_train), len(x_val), classes) == (105, 45, ["setosa", "versicolor", "virginica"])
    assert trainer.load_dataset(job) == (x_train, y_train, x_val, y_val, classes)
    other_seed = trainer.parse_args(["--model", "mlp", "--data", "package:iris.csv", "--seed", "4",
                                     "--split-recipe", "holdout-30", "--out", str(tmp_path)])
    assert trainer.load_dataset(other_seed)[3] != y_val
    for column in zip(*x_train):
        assert abs(sum(column) / len(column)) < 1e-9


@needs_torch
def test_train_on_the_iris_table_learns_it(tmp_path):
    proc = train(tmp_path, "logreg", {"epochs": 15, "lr": 0.1, "batch_size": 16, "data": "package:iris.csv"},
                 tmp_path / "out", recipe="holdout-20")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["history"][-1]["val_accuracy"] >= 0.85, metrics["history"][-1]
    assert "train=120 val=30" in (tmp_path / "out" / "train.log").read_text()


@needs_torch
def test_a_csv_with_a_label_column_anywhere_trains_gbt(tmp_path):
    rows = ["height,label,weight"] + [f"{150 + i},{'tall' if i >= 20 else 'short'},{50 + (i * 7) % 13}"
                                      for i in range(40)]
    (tmp_path / "people.csv").write_text("\n".join(rows) + "\n")
    proc = train(tmp_path, "gbt", {"trees": 3, "data": str(tmp_path / "people.csv")}, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["history"][-1]["val_accuracy"] >= 0.75


@pytest.mark.parametrize("table,hyper,message", [
    ("a,label\n1,x\n2,y\nthree,x\n", {}, "line 4: every column but 'label' must be a number"),
    ("a,b\n1,x\n2,y\n3\n", {}, "line 4: 1 values, the header has 2"),
    ("a,b\n1,x\n2,y\n3,z\n", {"trees": 2}, "gbt is a two-class model and the labels have 3 classes"),
])
def test_a_bad_table_is_exit_2_naming_the_line(tmp_path, table, hyper, message):
    pytest.importorskip("torch")
    (tmp_path / "t.csv").write_text(table)
    proc = subprocess.run(train_argv("gbt" if "trees" in hyper else "mlp", {**hyper, "data": str(tmp_path / "t.csv")},
                                     tmp_path / "out"), env=env_for(tmp_path), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_data_given_twice_differently_is_a_usage_error(tmp_path):
    from cis490fleet import trainer

    with pytest.raises(trainer.UsageError, match="differ"):
        trainer.parse_args(["--model", "mlp", "--data", "a.csv", "--hyper", '{"data": "b.csv"}', "--out", "x"])
    with pytest.raises(trainer.UsageError, match="no table 'nope.csv' ships with cis490fleet; shipped: iris.csv"):
        trainer.load_table("package:nope.csv")
