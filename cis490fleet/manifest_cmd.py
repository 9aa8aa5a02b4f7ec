"""`manifest check|ids`: validate a training manifest and list its job ids before serving it.

Shell: the only place that runs the trainer's ``describe`` command (a
subprocess with a timeout) and feeds its JSON to ``manifest.parse``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import cis490fleet
from cis490fleet import manifest
from cis490fleet.errors import FleetError, ManifestError
from cis490fleet.model import Manifest, TrainerConfig

DESCRIBE_TIMEOUT_S = 60.0
BUILTIN_DESCRIBE = ("{python}", "-m", "cis490fleet", "train", "--describe")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cis490fleet manifest",
                                     description="Check a training manifest, list its job ids.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="validate FILE: a summary, or every problem found",
                           description="Validate FILE. Exit 0 with a summary, or 1 listing every problem.")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--describe", action="store_true",
                       help="check hyper keys against what the trainer's [trainer].describe command prints")
    check.add_argument("--timeout", type=float, default=DESCRIBE_TIMEOUT_S, metavar="S",
                       help=f"seconds the describe command may take (default {DESCRIBE_TIMEOUT_S:g})")
    ids = sub.add_parser("ids", help="print one 'id model mode' line per job",
                         description="Print one 'id model mode' line per job of FILE, in manifest order.")
    ids.add_argument("file", metavar="FILE")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage line
        return stop.code if isinstance(stop.code, int) else 2

    try:
        if args.command == "ids":
            jobs = manifest.load(args.file).jobs
            try:
                for job in jobs:
                    print(f"{job.id} {job.model} {job.mode}")
                sys.stdout.flush()
            except BrokenPipeError:  # `manifest ids FILE | head`
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        m = manifest.load(args.file)
        checked = "trainer.hyper_keys" if m.trainer.hyper_keys else None
        if args.describe:
            m = manifest.load(args.file, describe=run_describe(m.trainer, timeout=args.timeout))
            checked = "the trainer's describe output"
        print(summary(m, checked))
        return 0
    except ManifestError as err:
        for line in err.problems:
            print(line, file=sys.stderr)
        if len(err.problems) > 1:
            print(f"cis490fleet manifest: {len(err.problems)} problems in {args.file}; fix them and run again",
                  file=sys.stderr)
        return 1
    except FleetError as err:
        print(f"cis490fleet manifest: {err}", file=sys.stderr)
        return 1


def summary(m: Manifest, checked: str | None) -> str:
    models = Counter(j.model for j in m.jobs)
    waiting = sum(1 for j in m.jobs if j.after)
    lines = [
        f"{m.source}: ok",
        f"  jobs:   {len(m.jobs)} ({waiting} waiting for others with 'after')",
        f"  hosts:  {len(m.hosts)}" + (f" ({', '.join(h.id for h in m.hosts)})" if m.hosts else ""),
        "  models: " + (", ".join(f"{name} {n}" for name, n in sorted(models.items())) or "none"),
        f"  sweeps expanded: {m.sweeps_expanded}",
        f"  peers:  {len(m.fleet.peers)}" + (f" ({', '.join(p for p, _ in m.fleet.peers)})" if m.fleet.peers else ""),
        "  hyper keys checked against: "
        + (checked or "nothing (declare [trainer].hyper_keys, or run with --describe)"),
    ]
    return "\n".join(lines)


def run_describe(trainer: TrainerConfig, *, timeout: float = DESCRIBE_TIMEOUT_S) -> dict[str, list[str]]:
    """Run ``[trainer].describe`` and return its model -> hyper keys table.

    Without a describe command, the built-in trainer (the default command) is asked.
    """
    import shlex
    import subprocess  # here, not at the top: a plain check never runs a command and starts 4 ms faster

    describe = trainer.describe or (BUILTIN_DESCRIBE if trainer.command == TrainerConfig().command else ())
    if not describe:
        raise FleetError('the manifest\'s [trainer] has no describe command; add one such as describe = '
                         '["{python}", "train.py", "--describe"], or check without --describe')
    argv = [arg.format(python=sys.executable) for arg in describe]
    shown = shlex.join(argv)
    env = dict(os.environ)
    # `{python} -m cis490fleet` must find this very package, also when it runs from the zipapp.
    home = str(Path(cis490fleet.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([home] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=timeout, env=env)
    except FileNotFoundError:
        raise FleetError(f"the trainer's describe command was not found: {argv[0]}; fix [trainer].describe") from None
    except subprocess.TimeoutExpired:
        raise FleetError(f"the trainer's describe command did not finish within {timeout:g} s ({shown}); "
                         "fix it or raise --timeout") from None
    except OSError as err:
        raise FleetError(f"cannot run the trainer's describe command ({shown}): {err.strerror or err}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
        raise FleetError(f"the trainer's describe command exited with status {proc.returncode} ({shown}): {last}")
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise FleetError(f"the trainer's describe command printed no JSON ({shown}); it must print "
                         '{"model": ["hyper key", ...], ...}') from None
    return describe_table(data, shown)


def describe_table(data, shown: str = "describe") -> dict[str, list[str]]:
    """Accept ``{model: [keys]}``, optionally under ``"models"``, a key list also as ``{"hyper_keys": [...]}``."""
    if isinstance(data, dict) and isinstance(data.get("models"), dict):
        data = data["models"]
    if not isinstance(data, dict):
        raise FleetError(f"the trainer's describe command ({shown}) printed {type(data).__name__} JSON; "
                         'expected {"model": ["hyper key", ...], ...}')
    table = {}
    for model, keys in data.items():
        if isinstance(keys, dict):
            keys = keys.get("hyper_keys", keys.get("hyper", []))
        if isinstance(keys, dict):
            keys = list(keys)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise FleetError(f"the trainer's describe command ({shown}) gave model {model!r} "
                             f"{json.dumps(keys)[:60]}; expected a list of hyper key names")
        table[str(model)] = keys
    return table
