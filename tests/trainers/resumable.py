"""Fixture trainer that checkpoints: ``steps`` steps ``sleep`` seconds apart (from --hyper), its state a hash chain.

After each step it writes ``state.json`` into CIS490_CHECKPOINT_DIR atomically (a "." temporary file,
then a rename) and a progress line naming it; on SIGTERM it checkpoints and exits 143. Given
CIS490_RESUME_FROM it carries on from the state there, so its result.json is the same however often
it was stopped. Prints "resumed at step N" when it resumed. With ``stall_at`` (hyper) it goes
silent after that step until SIGTERM.
"""

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))


def arg(name, default=None):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


hyper = json.loads(arg("--hyper", "{}"))
steps, pause = int(hyper.get("steps", 5)), float(hyper.get("sleep", 0.2))
stall_at = hyper.get("stall_at")
out = Path(arg("--out") or os.environ["CIS490_OUT"])
out.mkdir(parents=True, exist_ok=True)
progress = os.environ.get("CIS490_PROGRESS")
ckpt = Path(os.environ["CIS490_CHECKPOINT_DIR"]) if os.environ.get("CIS490_CHECKPOINT_DIR") else None
step, state = 0, hashlib.sha256(arg("--seed", "0").encode()).hexdigest()
resume = os.environ.get("CIS490_RESUME_FROM")
if resume:
    saved = json.loads((Path(resume) / "state.json").read_text())
    step, state = saved["step"], saved["state"]
    print(f"resumed at step {step}", flush=True)


def checkpoint():
    if ckpt is None:
        return
    tmp = ckpt / f".state.json.{os.getpid()}"
    tmp.write_text(json.dumps({"step": step, "state": state}))
    os.replace(tmp, ckpt / "state.json")
    if progress:
        with open(progress, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "epoch": step, "epochs": steps, "fraction": step / steps,
                                "checkpoint": "state.json"}) + "\n")


while step < steps:
    if stop:
        checkpoint()
        print(f"stopped at step {step}", flush=True)
        sys.exit(143)
    time.sleep(pause)
    if step == stall_at:
        continue
    step += 1
    state = hashlib.sha256(f"{state}:{step}".encode()).hexdigest()
    print(f"step {step}/{steps}", flush=True)
    checkpoint()
(out / "result.json").write_text(json.dumps({"steps": steps, "state": state}) + "\n", encoding="utf-8")
