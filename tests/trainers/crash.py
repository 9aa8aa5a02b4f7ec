"""Fixture trainer: reports one progress line, then fails with "boom: ..." on stderr and exit 3."""

import json
import os
import sys

path = os.environ.get("CIS490_PROGRESS")
if path:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 1, "epoch": 1, "epochs": 10, "loss": 9.9, "metrics": {}, "fraction": 0.1}) + "\n")
print("starting, about to crash", flush=True)
print("boom: simulated trainer crash (fixture tests/trainers/crash.py)", file=sys.stderr, flush=True)
sys.exit(3)
