"""Fixture trainer: progress lines, then metrics.json whose val_loss is |log10(lr) + 3| + seed / 100 (lr 1e-3 wins).

Optional hyper values: ``epochs`` (2) progress lines, ``sleep`` (0) seconds before each, so that heartbeats
carry every epoch to the coordinator's metric history.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
hyper = json.loads(args["--hyper"])
seed = int(args["--seed"])
out = Path(args["--out"])
epochs, pause = int(hyper.get("epochs", 2)), float(hyper.get("sleep", 0))
val_loss = abs(math.log10(hyper["lr"]) + 3) + seed / 100
for epoch in range(1, epochs + 1):
    time.sleep(pause)
    with open(os.environ["CIS490_PROGRESS"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"epoch": epoch, "epochs": epochs, "loss": 2.0 / epoch, "fraction": epoch / epochs,
                            "metrics": {"val_loss": val_loss + (epochs - epoch)}}) + "\n")
if not hyper.get("no_metrics_json"):
    (out / "metrics.json").write_text(json.dumps({
        "model": args["--model"], "seed": seed, "epochs": epochs, "hyper": hyper, "history": [{"epoch": epochs}],
        "val_loss": val_loss, "val_accuracy": 1 - val_loss / 10, "train_loss": 1.0}), encoding="utf-8")
(out / "model.txt").write_text(f"lr={hyper['lr']} seed={seed}\n", encoding="utf-8")
