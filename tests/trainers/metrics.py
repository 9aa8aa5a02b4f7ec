"""Fixture trainer: progress lines, then metrics.json whose val_loss is |log10(lr) + 3| + seed / 100 (lr 1e-3 wins)."""

import json
import math
import os
import sys
from pathlib import Path

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
hyper = json.loads(args["--hyper"])
seed = int(args["--seed"])
out = Path(args["--out"])
val_loss = abs(math.log10(hyper["lr"]) + 3) + seed / 100
with open(os.environ["CIS490_PROGRESS"], "a", encoding="utf-8") as f:
    for epoch in (1, 2):
        f.write(json.dumps({"epoch": epoch, "epochs": 2, "loss": 2.0 / epoch, "fraction": epoch / 2,
                            "metrics": {"val_loss": val_loss + (2 - epoch)}}) + "\n")
if not hyper.get("no_metrics_json"):
    (out / "metrics.json").write_text(json.dumps({
        "model": args["--model"], "seed": seed, "epochs": 2, "hyper": hyper, "history": [{"epoch": 2}],
        "val_loss": val_loss, "val_accuracy": 1 - val_loss / 10, "train_loss": 1.0}), encoding="utf-8")
(out / "model.txt").write_text(f"lr={hyper['lr']} seed={seed}\n", encoding="utf-8")
