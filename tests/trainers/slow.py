"""Fixture trainer: ``steps`` progress lines ``sleep`` seconds apart (from --hyper), then output and exit 0."""

import json
import os
import sys
import time
from pathlib import Path


def parse(argv):
    args, i = {}, 0
    while i < len(argv):
        if argv[i].startswith("--"):
            key = argv[i][2:].replace("-", "_")
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                args[key], i = argv[i + 1], i + 2
                continue
            args[key] = True
        i += 1
    return args


args = parse(sys.argv[1:])
hyper = json.loads(args.get("hyper") or "{}")
steps, pause = int(hyper.get("steps", 5)), float(hyper.get("sleep", 0.2))
out = Path(args.get("out") or os.environ["CIS490_OUT"])
out.mkdir(parents=True, exist_ok=True)
progress = os.environ.get("CIS490_PROGRESS")
for step in range(1, steps + 1):
    time.sleep(pause)
    if progress:
        with open(progress, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "epoch": step, "epochs": steps, "loss": 1.0 / step,
                                "metrics": {}, "fraction": step / steps}) + "\n")
    print(f"step {step}/{steps}", flush=True)
(out / "result.json").write_text(json.dumps({"steps": steps}) + "\n", encoding="utf-8")
