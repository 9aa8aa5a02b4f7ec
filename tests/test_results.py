"""Results: each completed job's final metrics, kept by the coordinator and ranked best first."""

from __future__ import annotations

import csv
import io
import json
import math

from cis490fleet import results, slots
from test_ops_cli import jobs
from test_worker import cpu_host, make_worker, trainer_manifest  # noqa: F401 (cpu_host is a fixture)

SWEEP = """
    [[sweeps]]
    name = "lr"
    model = "mlp"
    mode = "sweep"
    hyper = { lr = [1e-1, 1e-3, 1e-5, 1e-2] }

    [[jobs]]
    name = "plain"
    model = "mlp"
    mode = "no-metrics-json"
    hyper = { lr = 1e-3, no_metrics_json = true }
"""


def expected_loss(lr: float, seed: int = 0) -> float:
    return abs(math.log10(lr) + 3) + seed / 100


def test_final_metrics_keep_finite_numbers_and_leave_bookkeeping_out():
    got = results.final_metrics({"epoch": 3, "epochs": 10, "seed": 1, "fraction": 0.3, "loss": 0.5, "ok": True,
                                 "bad": float("nan"), "huge": float("inf"), "name": "x", "hyper": {"lr": 1},
                                 "metrics": {"val_loss": 0.25, "loss": 0.4}})
    assert got == {"loss": 0.4, "val_loss": 0.25}
    assert results.final_metrics(None, {"loss": 1}) == {"loss": 1.0}
    assert results.final_metrics({"epochs": 2}, {"val_acc": 0.5}) == {"val_acc": 0.5}


def test_losses_rank_lowest_first_and_scores_highest_first_with_missing_last():
    rows = [{"id": "a", "metrics": {"val_loss": 0.3, "val_accuracy": 0.7}},
            {"id": "b", "metrics": {}},
            {"id": "c", "metrics": {"val_loss": 0.1, "val_accuracy": 0.9}},
            {"id": "d", "metrics": {"val_loss": 0.2, "val_accuracy": 0.95}}]
    assert [r["id"] for r in results.rank(rows, "val_loss")] == ["c", "d", "a", "b"]
    assert [r["id"] for r in results.rank(rows, "val_accuracy")] == ["d", "c", "a", "b"]
    assert [r["id"] for r in results.rank(rows, "val_loss", "max")] == ["a", "d", "c", "b"]
    assert results.default_metric(["train_loss", "val_accuracy", "val_loss"]) == "val_loss"
    assert results.default_metric(["acc", "val_accuracy"]) == "val_accuracy"
    assert results.default_metric([]) is None


def test_a_sweep_from_workers_to_a_ranked_table(live_server, tmp_path, cpu_host):
    server = live_server(trainer_manifest("metrics.py", SWEEP))
    w = make_worker(server.url, tmp_path)
    while w.run_once() == slots.COMPLETED:
        pass
    code, out, err = jobs(server.url, "results", "--sweep", "lr", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["sort"] == "val_loss" and answer["order"] == "min"
    assert [r["hyper"]["lr"] for r in answer["results"]] == [1e-3, 1e-2, 1e-1, 1e-5]
    for row in answer["results"]:
        assert row["sweep"] == "lr"
        assert row["metrics"]["val_loss"] == expected_loss(row["hyper"]["lr"])
        assert set(row["metrics"]) == {"val_loss", "val_accuracy", "train_loss"}

    code, out, _ = jobs(server.url, "results", "--sweep", "lr", "--sort", "val_accuracy", "--csv")
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == ["name", "id", "model", "mode", "seed", "lr", "train_loss", "val_accuracy", "val_loss"]
    assert [float(r[5]) for r in table[1:]] == [1e-3, 1e-2, 1e-1, 1e-5]

    code, out, _ = jobs(server.url, "results", "--model", "mlp", "--json")
    plain = [r for r in json.loads(out)["results"] if r["name"] == "plain"]
    assert plain[0]["metrics"] == {"loss": 1.0, "val_loss": expected_loss(1e-3)}  # its last progress line

    code, out, _ = jobs(server.url, "results", "--sweep", "lr")
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "ID"] and "VAL_LOSS (min)" in lines[0]
    assert lines[1].split()[0] == "lr-1"  # lr = 1e-3

    code, _, err = jobs(server.url, "results", "--sort", "val_los")
    assert code == 2  # a metric no job reported is a usage error
    assert "no completed job reported a metric 'val_los'" in err and "val_loss" in err
