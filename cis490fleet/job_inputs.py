"""One attempt's inputs on the worker: the bundles of the jobs it waits for, verified and extracted.

A job that is ``after`` others gets their results: the claim names each dependency's
artifact (``inputs``: name, job id, sha256). Before the trainer starts, each is downloaded
(its sha256 checked against the id), extracted with ``bundle.extract_bundle``'s safe
extraction into ``inputs/<name>/``, and the folder is passed as ``CIS490_INPUTS``; the
trainer command's ``{input.NAME}`` is that input's folder and ``{inputs}`` the parent folder.
An input that cannot be had is the fleet's fault, not the job's (the attempt is retried);
a command that names an input the job does not have is a mistake in the manifest.
Never starts the trainer (trainer_process.py) and never reports the attempt.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from cis490fleet import errors
from cis490fleet.worker_view import logger

log = logger(__name__)

INPUT_RE = re.compile(r"\{input\.([A-Za-z0-9][A-Za-z0-9._-]{0,127})\}")


class MissingInput(errors.BadRequest):
    """The trainer command names an input this job does not have."""


def named_inputs(template: list[str]) -> list[str]:
    """The input names a trainer command's ``{input.NAME}`` placeholders use, in order, once each."""
    return list(dict.fromkeys(m.group(1) for arg in template for m in INPUT_RE.finditer(str(arg))))


def fetch(client: Any, run: Any) -> dict[str, Path]:
    """Download and extract every input of ``run``'s claim into ``run.dir / "inputs"``; {name: folder}."""
    from cis490fleet import bundle

    listed = run.claim.get("inputs") if isinstance(run.claim.get("inputs"), list) else []
    root = run.dir / "inputs"
    folders: dict[str, Path] = {}
    for item in listed:
        name, sha = str(item.get("name", "")), item.get("artifact_id")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
            raise errors.FleetError(f"the claim names an input {name[:60]!r} that is not a job name; "
                                    "update the coordinator")
        download = run.dir / f"input-{name}.bundle"
        dest = root / name
        try:
            client.download_artifact(sha, download)
            shutil.rmtree(dest, ignore_errors=True)
            bundle.extract_bundle(download, dest)
        except (errors.FleetError, OSError) as err:
            raise errors.Unavailable(f"cannot fetch input {name!r} (job {str(item.get('job_id'))[:12]}, "
                                     f"artifact {str(sha)[:12]}): {err}") from None
        finally:
            download.unlink(missing_ok=True)
        folders[name] = dest
        log.info("job %s: input %s ready (artifact %s verified)", run.label, name, str(sha)[:12])
    wanted = named_inputs(run.trainer.get("command") or [])
    missing = [n for n in wanted if n not in folders]
    if missing:
        have = ", ".join(sorted(folders)) or "none"
        raise MissingInput(f"the trainer command uses {{input.{missing[0]}}} but job {run.label} has no input "
                           f"{missing[0]!r} (its inputs: {have}); add {missing[0]!r} to the job's 'after', or "
                           "use a trainer command without that placeholder")
    root.mkdir(parents=True, exist_ok=True)
    return folders
