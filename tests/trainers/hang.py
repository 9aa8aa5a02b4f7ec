"""Fixture trainer: reports that it started, then sleeps forever; SIGTERM has its default effect."""

import json
import os
import time

path = os.environ.get("CIS490_PROGRESS")
if path:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 0, "epoch": 0, "epochs": 1, "loss": None, "metrics": {}, "fraction": 0.0}) + "\n")
print(f"hanging, pid {os.getpid()}", flush=True)
while True:
    time.sleep(3600)
