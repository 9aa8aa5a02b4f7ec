"""Fixture trainer: prints the GPUs it was given, then ``steps`` progress lines ``sleep`` seconds apart, each
reporting ``peak_vram_gib`` from --hyper when given (as the built-in trainer does on CUDA); exits 0."""

import json
import os
import sys
import time
from pathlib import Path

argv = sys.argv[1:]
args = {argv[i][2:]: argv[i + 1] for i in range(0, len(argv) - 1, 2)}
hyper = json.loads(args.get("hyper") or "{}")
steps, pause = int(hyper.get("steps", 5)), float(hyper.get("sleep", 0.2))
print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} "
      f"CIS490_GPUS={os.environ.get('CIS490_GPUS')!r}", flush=True)
out = Path(args.get("out") or os.environ["CIS490_OUT"])
out.mkdir(parents=True, exist_ok=True)
for step in range(1, steps + 1):
    time.sleep(pause)
    line = {"epoch": step, "epochs": steps, "loss": 1.0 / step}
    if "peak_vram_gib" in hyper:
        line["peak_vram_gib"] = hyper["peak_vram_gib"]
    with open(os.environ["CIS490_PROGRESS"], "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
(out / "result.json").write_text(json.dumps({"steps": steps}) + "\n", encoding="utf-8")
