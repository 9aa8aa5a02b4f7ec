"""``jobs submit``: jobs added without editing the manifest, checked exactly as the manifest's are.

Pure. A submission is a TOML snippet of ``[[jobs]]`` and ``[[sweeps]]`` tables (from a file, stdin,
or built from the CLI's flags by ``snippet_from_flags``). It is checked together with the manifest
in force, by the same parser, so the trainer's hyper keys, names and ``after`` resolve as they would
in the file; the submitted jobs are those the manifest does not already hold.
"""

from __future__ import annotations

import re
import tomllib

from cis490fleet import manifest as manifest_mod
from cis490fleet.errors import BadRequest, ManifestError
from cis490fleet.model import JobSpec, canonical_json

ALLOWED_TABLES = ("jobs", "sweeps")
SOURCE = "submitted"


def new_jobs(snippet: str, manifest_text: str | None) -> list[JobSpec]:
    """The jobs ``snippet`` adds to the manifest in force; ManifestError naming every problem."""
    try:
        data = tomllib.loads(snippet)
    except tomllib.TOMLDecodeError as err:
        raise ManifestError([f"{SOURCE}: {err}; fix the TOML"]) from None
    other = sorted(set(data) - set(ALLOWED_TABLES))
    if other:
        raise ManifestError([f"{SOURCE}: only [[jobs]] and [[sweeps]] can be submitted, not {', '.join(other)}; "
                             "change the fleet, trainer or hosts in the manifest and run jobs reload"])
    if not any(data.get(k) for k in ALLOWED_TABLES):
        raise ManifestError([f"{SOURCE}: no [[jobs]] or [[sweeps]] table: nothing to submit"])
    base_text = manifest_text or ""
    base = manifest_mod.parse(base_text, "manifest") if base_text else None
    combined = manifest_mod.parse(base_text + "\n\n" + snippet, f"manifest + {SOURCE}")
    known = {j.id for j in base.jobs} if base is not None else set()
    return [job for job in combined.jobs if job.id not in known]


def _toml_value(text: str):
    """A flag's value as TOML reads it (1e-3, 64, true, "x", [1, 2]); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else canonical_json(key)


def _toml(value) -> str:
    if isinstance(value, str):
        return canonical_json(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def snippet_from_flags(*, model: str, mode: str, hyper: list[str], sweep: list[str], name: str | None = None,
                       seed: int | None = None) -> str:
    """A ``[[jobs]]`` table (or ``[[sweeps]]`` when ``sweep`` lists alternatives) from ``jobs submit``'s flags.

    ``hyper``: ``KEY=VALUE`` items; ``sweep``: ``hyper.KEY=V1,V2,…`` (or ``seed=1,2,3``) items."""
    fixed: dict = {}
    for item in hyper:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadRequest(f"--hyper {item!r}: write KEY=VALUE, e.g. --hyper lr=1e-3")
        fixed[key.strip()] = _toml_value(value.strip())
    axes: dict = {}
    seeds = None
    for item in sweep:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values or not (key.startswith("hyper.") or key == "seed"):
            raise BadRequest(f"--sweep {item!r}: write hyper.KEY=V1,V2 (or seed=1,2,3), e.g. --sweep hyper.lr=1e-3,1e-4")
        parsed = [_toml_value(v.strip()) for v in values.split(",")]
        if key == "seed":
            seeds = parsed
        else:
            axes[key[len("hyper."):]] = parsed
    table = "[[sweeps]]" if axes or seeds else "[[jobs]]"
    lines = [table]
    if name:
        lines.append(f"name = {_toml(name)}")
    lines += [f"model = {_toml(model)}", f"mode = {_toml(mode)}"]
    if seeds is not None:
        lines.append(f"seed = {_toml(seeds)}")
    elif seed is not None:
        lines.append(f"seed = {seed}")
    hyper_all = {**fixed, **axes}
    if hyper_all:
        lines.append("hyper = { " + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in hyper_all.items()) + " }")
    return "\n".join(lines) + "\n"
