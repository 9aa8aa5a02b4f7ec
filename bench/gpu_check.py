#!/usr/bin/env python3
"""One prepared check for a machine with NVIDIA GPUs: detection, per-GPU slots, VRAM accounting with two
jobs on one card, and the built-in trainer on CUDA (DistributedDataParallel too, with two GPUs or more).

    python3 bench/gpu_check.py [--work DIR]

Prints a report, one line per check (``ok``, ``FAILED`` or ``skipped`` and why), and exits 1 when a check
failed. Without CUDA it says so and checks only what needs no GPU; the CUDA checks are then skipped.
Everything runs in a temporary folder; nothing is installed or left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cis490fleet import capability, policy  # noqa: E402
from cis490fleet.jobstore import JobStore  # noqa: E402
from cis490fleet.model import FleetConfig, HostSpec, JobSpec, Manifest  # noqa: E402

T0 = 1_700_000_000.0
results: list[tuple[str, str, str]] = []


def check(name: str, status: str, detail: str) -> None:
    results.append((name, status, detail))
    print(f"{name:<24} {status:<8} {detail}", flush=True)


def train(work: Path, name: str, hyper: dict, devices: str, gpus: int = 1) -> subprocess.Popen:
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=devices, CIS490_GPUS=str(gpus),
               CIS490_PROGRESS=str(out / "progress.jsonl"), CIS490_JOB_ID="ab" * 32, CIS490_ATTEMPT="1")
    argv = [sys.executable, "-m", "cis490fleet", "train", "--model", "mlp", "--mode", name, "--hyper",
            json.dumps(hyper), "--seed", "1", "--out", str(out / "out")]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out)


def finished(proc: subprocess.Popen, work: Path, name: str) -> tuple[bool, str, list[dict]]:
    text = proc.communicate(timeout=600)[0]
    progress = work / name / "progress.jsonl"
    rows = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
    return proc.returncode == 0, text, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = p.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cis490-gpu-check-") as tmp:
        work = Path(args.work or tmp)
        run_checks(work)
    print(f"\n{sum(s == 'ok' for _, s, _ in results)} ok, {sum(s == 'FAILED' for _, s, _ in results)} failed, "
          f"{sum(s == 'skipped' for _, s, _ in results)} skipped in {time.time() - started:.0f} s")
    return 1 if any(s == "FAILED" for _, s, _ in results) else 0


def run_checks(work: Path) -> None:
    cap = capability.detect(work_dir=str(work), timeout=30)
    gpus = policy.host_gpus(cap)
    print(f"python {cap['python']}, torch {cap['torch']}, {cap['cores']} cores, {cap['ram_gib']:.0f} GiB RAM")
    if not gpus:
        check("detection", "skipped", "no CUDA: neither nvidia-smi nor torch sees a GPU on this machine, so the "
                                      "GPU checks below are skipped; run this script on a GPU machine")
    else:
        check("detection", "ok", "; ".join(f"GPU {g['index']}: {g['name']} {g['vram_gib']:.1f} GiB" for g in gpus))

    plan = policy.plan_slots(cap)
    want = [[g["index"]] for g in gpus] or [[]]
    check("per-GPU slots", "ok" if [s["gpus"] for s in plan] == want else "FAILED",
          f"{len(plan)} slot(s): " + ", ".join(f"slot {s['index']} -> GPU {s['gpus'] or 'none'}" for s in plan))
    if not gpus:
        for name in ("VRAM accounting", "trainer on CUDA", "two jobs on one card", "DDP on 2 GPUs"):
            check(name, "skipped", "no CUDA")
        return

    card = max(gpus, key=lambda g: g["vram_gib"])
    share = round(card["vram_gib"] * 0.4, 1)
    store = JobStore(work / "queue.sqlite3")
    try:
        jobs = [JobSpec(model="mlp", mode="check", seed=i, require_cuda=True, min_vram_gib=share) for i in range(3)]
        store.execute({"op": "sync_manifest", "now": T0, "manifest": Manifest(
            fleet=FleetConfig(), hosts=(HostSpec(id="gpu-check", slots=3, gpu_share=True),), jobs=tuple(jobs)
        ).to_json()})
        slot = {"index": 0, "gpus": [{"index": card["index"], "free_vram_gib": card["vram_gib"]}]}
        got = [store.execute({"op": "claim", "now": T0, "host": "gpu-check", "capability": cap, "lease": f"L{i}",
                              "slot": {**slot, "index": i}}) for i in range(3)]
        placed = [g.get("gpus") for g in got]
        ok = placed[:2] == [[card["index"]], [card["index"]]] and got[2] == {"job": None}
        why = [r for r in store.job(jobs[2].id, T0)["why_pending"] if "GiB free" in r]
        check("VRAM accounting", "ok" if ok else "FAILED",
              f"two {share} GiB jobs share GPU {card['index']} ({card['vram_gib']:.1f} GiB), a third is refused: "
              f"{why[0] if why else placed}")
    finally:
        store.close()

    hyper = {"epochs": 3, "hidden": 1024, "batch_size": 256}
    ok, text, rows = finished(train(work, "cuda", hyper, str(card["index"])), work, "cuda")
    peaks = [r.get("peak_vram_gib") for r in rows]
    on_cuda = "device=cuda" in text
    check("trainer on CUDA", "ok" if ok and on_cuda and all(peaks) else "FAILED",
          f"exit {'0' if ok else 'non-zero'}, device={'cuda' if on_cuda else 'not cuda'}, peak VRAM per epoch "
          f"{peaks} GiB" + ("" if ok else f"\n{text[-2000:]}"))

    both = [train(work, f"share-{i}", {"epochs": 20, "hidden": 1024, "batch_size": 64}, str(card["index"]))
            for i in range(2)]
    outcomes = [finished(proc, work, f"share-{i}") for i, proc in enumerate(both)]
    check("two jobs on one card", "ok" if all(o[0] and o[2] and o[2][-1].get("peak_vram_gib") for o in outcomes)
          else "FAILED",
          f"two trainers at once on GPU {card['index']}: peaks "
          f"{[o[2][-1].get('peak_vram_gib') if o[2] else None for o in outcomes]} GiB")

    if len(gpus) < 2:
        check("DDP on 2 GPUs", "skipped", f"this machine has {len(gpus)} GPU")
        return
    devices = ",".join(str(g["index"]) for g in gpus[:2])
    ok, text, rows = finished(train(work, "ddp", hyper, devices, gpus=2), work, "ddp")
    check("DDP on 2 GPUs", "ok" if ok and "nccl on CUDA" in text else "FAILED",
          f"GPUs {devices}: {'nccl' if 'nccl on CUDA' in text else 'not nccl'}, {len(rows)} epochs reported"
          + ("" if ok else f"\n{text[-2000:]}"))


if __name__ == "__main__":
    raise SystemExit(main())
