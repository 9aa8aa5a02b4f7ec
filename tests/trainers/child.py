"""Fixture trainer for inputs: a baseline job writes result.json; any other records what CIS490_INPUTS held."""

import json
import os
import sys
from pathlib import Path

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
out = Path(args["--out"])
out.mkdir(parents=True, exist_ok=True)
if args["--mode"] == "baseline":
    (out / "result.json").write_text(json.dumps({"from": "base", "seed": args["--seed"]}))
else:
    inputs = Path(os.environ["CIS490_INPUTS"])
    seen = {p.name: json.loads((p / "result.json").read_text()) for p in sorted(inputs.iterdir())}
    (out / "seen.json").write_text(json.dumps({"inputs": seen, "folder": args["--inputs"]}, sort_keys=True))
