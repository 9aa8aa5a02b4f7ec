"""Fixture trainer: floods stdout and stderr (``lines`` each, from --hyper, default 20000), then exit 0."""

import json
import os
import sys
from pathlib import Path

argv = sys.argv[1:]
hyper = json.loads(argv[argv.index("--hyper") + 1]) if "--hyper" in argv else {}
out_arg = argv[argv.index("--out") + 1] if "--out" in argv else None
lines = int(hyper.get("lines", 20000))
out = Path(out_arg or os.environ["CIS490_OUT"])
out.mkdir(parents=True, exist_ok=True)
for i in range(lines):
    sys.stdout.write(f"stdout line {i}: " + "x" * 100 + "\n")
    sys.stderr.write(f"stderr line {i}: " + "y" * 100 + "\n")
sys.stdout.write("noisy: done\n")
sys.stdout.flush()
(out / "result.json").write_text(json.dumps({"lines": lines}) + "\n", encoding="utf-8")
