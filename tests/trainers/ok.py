"""Fixture trainer: a few progress lines, a small deterministic output file, exit 0."""

import json
import os
import sys
from pathlib import Path


def parse(argv):
    """``--key value`` pairs, loosely: unknown flags are kept, a flag without a value is True."""
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


def progress(row):
    path = os.environ.get("CIS490_PROGRESS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


args = parse(sys.argv[1:])
out = Path(args.get("out") or os.environ["CIS490_OUT"])
out.mkdir(parents=True, exist_ok=True)
steps = 3
for step in range(1, steps + 1):
    progress({"step": step, "epoch": step, "epochs": steps, "loss": 1.0 / step, "metrics": {"acc": step / steps},
              "fraction": step / steps})
result = {k: args.get(k) for k in ("model", "mode", "hyper", "seed", "split_recipe")}
(out / "result.json").write_text(json.dumps(result, sort_keys=True) + "\n", encoding="utf-8")
print(f"ok: trained {result['model']} for job {os.environ.get('CIS490_JOB_ID', '-')}", flush=True)
