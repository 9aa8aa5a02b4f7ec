"""Fixture trainer: appends when it starts and stops to the file named by hyper ``stamps`` (JSON lines with
``event``, ``attempt``, ``t`` = time.time()), runs ``steps`` progress lines ``sleep`` seconds apart, and on
SIGTERM records its stop and exits 143 at once."""

import json
import os
import signal
import sys
import time
from pathlib import Path

args = sys.argv[1:]
hyper = json.loads(args[args.index("--hyper") + 1])
out = Path(args[args.index("--out") + 1])
stamps = hyper["stamps"]
attempt = int(os.environ.get("CIS490_ATTEMPT", "0"))


def stamp(event: str) -> None:
    with open(stamps, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "attempt": attempt, "t": time.time()}) + "\n")


def on_term(*_):
    stamp("stop")
    sys.exit(143)


signal.signal(signal.SIGTERM, on_term)
stamp("start")
progress = os.environ.get("CIS490_PROGRESS")
for step in range(1, int(hyper["steps"]) + 1):
    time.sleep(float(hyper["sleep"]))
    if progress:
        with open(progress, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "epoch": step, "epochs": hyper["steps"],
                                "fraction": step / hyper["steps"]}) + "\n")
out.mkdir(parents=True, exist_ok=True)
(out / "result.json").write_text(json.dumps({"steps": hyper["steps"]}) + "\n", encoding="utf-8")
signal.signal(signal.SIGTERM, signal.SIG_DFL)
stamp("stop")
