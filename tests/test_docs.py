"""Docs say what the code does: the documented behaviours are checked against the code that has them."""

from __future__ import annotations

import re
from pathlib import Path

from cis490fleet import jobs, openapi
from cis490fleet.model import FleetConfig

ROOT = Path(__file__).resolve().parent.parent


def test_retry_backoff_is_documented_as_doubling_up_to_an_hour():
    base = 60.0
    waits = [jobs.backoff_s(n, base) for n in range(1, 12)]
    assert waits[:3] == [60.0, 120.0, 240.0] and max(waits) == 3600.0 == waits[-1]
    example = (ROOT / "etc" / "training_manifest.toml.example").read_text(encoding="utf-8")
    said = " ".join(re.search(r"^retry_backoff_s = 60\s+#(.*\n(?:\s+#.*\n)*)", example, re.M).group(1).split())
    assert "doubles" in said and "up to an hour" in said, said
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"`retry_backoff_s` (default {FleetConfig().retry_backoff_s:g} s)" in readme
    assert "doubling with each failure of the job, up to an hour" in readme


def test_train_hosts_is_documented_as_ignored_by_the_built_in_trainer():
    from cis490fleet import trainer

    source = Path(trainer.__file__).read_text(encoding="utf-8")
    assert "--train-hosts" in source and ".train_hosts" not in source  # accepted, and really ignored
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`{train_hosts}` (JSON; the built-in trainer ignores it)" in readme
    example = (ROOT / "etc" / "training_manifest.toml.example").read_text(encoding="utf-8")
    assert "the built-in trainer has one dataset per job and ignores it" in " ".join(example.replace("#", "").split())


def test_requeue_is_summarised_as_what_it_does():
    summary = openapi.PATHS["/v1/job/{id}/requeue"]["post"]["summary"]
    assert "failed or cancelled" in summary and "finished" not in summary
    assert "409 for a completed" in summary


def test_bench_readme_speaks_of_measured_conditions_not_of_people():
    text = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    words = re.findall(r"\b(engineers?|engineer [A-Z]|session|agents?|the issue|owner'?s?)\b", text, re.I)
    assert not words, words
