"""Fixture trainer: reports one progress line, then dies of SIGKILL as under the kernel's OOM killer."""

import json
import os
import signal

path = os.environ.get("CIS490_PROGRESS")
if path:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 1, "epoch": 1, "epochs": 10, "loss": 9.9, "metrics": {}, "fraction": 0.1}) + "\n")
print("allocating far too much memory", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
