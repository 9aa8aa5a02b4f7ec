"""The manifest parser: the format, sweeps, and one test per class of error with its exact message."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cis490fleet import manifest, manifest_cmd
from cis490fleet.errors import ManifestError
from cis490fleet.model import FleetConfig, JobSpec, TrainerConfig, compute_job_id

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "training_manifest.toml.example"
SRC = "training_manifest.toml"

JOB = '[[jobs]]\nmodel = "mlp"\nmode = "train"\n'


def parse(text: str, **kw):
    return manifest.parse(textwrap.dedent(text), **kw)


def problems(text: str, **kw) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse(text, **kw)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def only_problem(text: str, **kw) -> str:
    found = problems(text, **kw)
    assert len(found) == 1, found
    return found[0]


# -- what a valid manifest becomes --


def test_minimal_manifest_takes_every_default():
    m = parse(JOB)
    assert m.fleet == FleetConfig()
    assert m.trainer == TrainerConfig()
    assert m.hosts == ()
    assert m.jobs == (JobSpec(model="mlp", mode="train"),)
    assert m.source == SRC
    assert m.sweeps_expanded == 0


def test_empty_manifest_has_no_jobs():
    assert parse("").jobs == ()


def test_every_field_reaches_the_model():
    m = parse("""
        [fleet]
        name = "lab"
        stale_after_s = 90
        heartbeat_s = 30
        max_attempts = 5
        max_artifact_bytes = 1024
        retry_backoff_s = 0
        worker_timeout_s = 45.5
        [[fleet.peers]]
        id = "pi"
        url = "https://pi.lab:8445/"
        [[fleet.peers]]
        id = "ws-a"
        url = "http://10.0.0.2:8445"

        [trainer]
        command = ["{python}", "train.py", "--hyper={hyper}", "{out}", "{{literal}}"]
        describe = ["{python}", "train.py", "--describe"]
        [trainer.hyper_keys]
        mlp = ["lr", "hidden"]
        "*" = ["epochs"]

        [[hosts]]
        id = "ws-a"
        allow_jobs = ["mlp*", "logreg"]
        deny_jobs = ["mlp-huge"]
        slots = 2
        role = "both"
        [hosts.capability]
        cuda = true
        vram_gib = 24
        cores = 16
        os = "Linux"
        gpus = [{index = 0, name = "RTX 4090", vram_gib = 24}]

        [[jobs]]
        name = "first"
        model = "mlp"
        mode = "train"
        hyper = { lr = 1e-3, hidden = [64, 64], epochs = 3 }
        split_recipe = "holdout-20"
        train_hosts = ["h1", "h2"]
        seed = 42
        require_cuda = true
        prefer_cuda = true
        min_vram_gib = 6
        min_ram_gib = 1.5
        allowed_hosts = ["ws-a"]
        priority = -3
        retries = 0

        [[jobs]]
        model = "logreg"
        mode = "train"
        after = ["first"]
    """)
    assert m.fleet == FleetConfig(name="lab", stale_after_s=90.0, heartbeat_s=30.0, max_attempts=5,
                                  max_artifact_bytes=1024, retry_backoff_s=0.0, worker_timeout_s=45.5,
                                  peers=(("pi", "https://pi.lab:8445"), ("ws-a", "http://10.0.0.2:8445")))
    assert m.trainer.command == ("{python}", "train.py", "--hyper={hyper}", "{out}", "{{literal}}")
    assert m.trainer.describe == ("{python}", "train.py", "--describe")
    assert m.trainer.accepted_keys("mlp") == {"lr", "hidden", "epochs"}
    (host,) = m.hosts
    assert (host.id, host.allow_jobs, host.deny_jobs, host.slots, host.role) == \
        ("ws-a", ("mlp*", "logreg"), ("mlp-huge",), 2, "both")
    assert host.capability == {"cuda": True, "vram_gib": 24.0, "cores": 16, "os": "Linux",
                               "gpus": [{"index": 0, "name": "RTX 4090", "vram_gib": 24.0}]}
    first, second = m.jobs
    assert first == JobSpec(model="mlp", mode="train", hyper={"lr": 0.001, "hidden": [64, 64], "epochs": 3},
                            split_recipe="holdout-20", train_hosts=("h1", "h2"), seed=42, require_cuda=True,
                            prefer_cuda=True, min_vram_gib=6.0, min_ram_gib=1.5, allowed_hosts=("ws-a",),
                            priority=-3, retries=0, name="first")
    assert first.id == compute_job_id("mlp", "train", {"epochs": 3, "hidden": [64, 64], "lr": 0.001}, "holdout-20",
                                      ["h1", "h2"], 42)
    assert second.after == ("first",) and second.name is None and second.retries is None


def test_parsed_manifest_survives_json():
    from cis490fleet.model import Manifest

    m = manifest.load(EXAMPLE)
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m


def test_example_manifest_is_valid_and_exercises_every_constraint():
    m = manifest.load(EXAMPLE)
    assert len(m.jobs) >= 12
    assert [h.id for h in m.hosts] == ["pi", "ws-a", "ws-b", "win-cpu"]
    assert m.fleet.peers == ()  # `serve --manifest` of the example as it stands is a single coordinator
    assert m.sweeps_expanded > 0
    assert any(j.after for j in m.jobs)
    assert {j.model for j in m.jobs} == {"mlp", "logreg", "gbt"}
    assert any(j.require_cuda for j in m.jobs) and any(j.prefer_cuda for j in m.jobs)
    assert any(j.min_vram_gib for j in m.jobs) and any(j.min_ram_gib for j in m.jobs)
    assert any(j.allowed_hosts for j in m.jobs) and any(j.retries is not None for j in m.jobs)
    assert len({j.priority for j in m.jobs}) > 1
    pi = m.host("pi")
    assert pi.role == "coordinator" and (pi.deny_jobs or pi.allow_jobs != ("*",))
    assert m.host("ws-a").capability["vram_gib"] > m.host("ws-b").capability["vram_gib"] > 0
    assert m.host("win-cpu").capability["cuda"] is False
    assert m.trainer.accepted_keys("mlp") == {"lr", "epochs", "hidden", "batch_size", "weight_decay"}
    assert m.trainer.accepted_keys("logreg") == {"lr", "epochs", "batch_size", "weight_decay"}


def test_example_passes_the_describe_table_of_the_built_in_trainer():
    from cis490fleet import trainer

    assert len(manifest.load(EXAMPLE, describe=trainer.describe()).jobs) >= 12


# -- sweeps --


def test_sweep_expands_to_the_cross_product_in_documented_order():
    m = parse("""
        [[sweeps]]
        name = "s"
        model = "mlp"
        mode = ["train", "eval"]
        seed = [0, 1]
        hyper = { lr = [0.1, 0.01], epochs = 5 }
        min_ram_gib = 2
    """)
    got = [(j.mode, j.seed, j.hyper["lr"], j.name) for j in m.jobs]
    assert got == [("train", 0, 0.1, "s-0"), ("train", 0, 0.01, "s-1"), ("train", 1, 0.1, "s-2"),
                   ("train", 1, 0.01, "s-3"), ("eval", 0, 0.1, "s-4"), ("eval", 0, 0.01, "s-5"),
                   ("eval", 1, 0.1, "s-6"), ("eval", 1, 0.01, "s-7")]
    assert all(j.hyper["epochs"] == 5 and j.min_ram_gib == 2.0 for j in m.jobs)
    assert list(m.jobs[0].hyper) == ["lr", "epochs"]  # the order written in the manifest
    assert m.sweeps_expanded == 8


def test_hyper_keys_of_a_sweep_vary_by_name_order_not_document_order():
    m = parse("""
        [[sweeps]]
        model = "mlp"
        mode = "train"
        hyper = { b = [1, 2], a = [10, 20] }
    """)
    assert [(j.hyper["a"], j.hyper["b"]) for j in m.jobs] == [(10, 1), (10, 2), (20, 1), (20, 2)]
    assert all(j.name is None for j in m.jobs)


def test_sweep_train_hosts_as_list_of_lists_are_alternatives():
    m = parse("""
        [[sweeps]]
        model = "mlp"
        mode = "train"
        train_hosts = [["a", "b"], ["c"], []]
        split_recipe = ["default", "holdout-20"]
    """)
    assert [(j.split_recipe, j.train_hosts) for j in m.jobs] == [
        ("default", ("a", "b")), ("default", ("c",)), ("default", ()),
        ("holdout-20", ("a", "b")), ("holdout-20", ("c",)), ("holdout-20", ())]
    plain = parse('[[sweeps]]\nmodel = "mlp"\nmode = "train"\ntrain_hosts = ["a", "b"]\n')
    assert [j.train_hosts for j in plain.jobs] == [("a", "b")]


def test_sweep_model_list_and_after_on_every_job():
    m = parse("""
        [[jobs]]
        name = "prep"
        model = "logreg"
        mode = "train"
        [[sweeps]]
        model = ["mlp", "logreg"]
        mode = "train"
        seed = [1, 2]
        after = ["prep"]
    """)
    assert [(j.model, j.seed) for j in m.jobs[1:]] == [("mlp", 1), ("mlp", 2), ("logreg", 1), ("logreg", 2)]
    assert all(j.after == ("prep",) for j in m.jobs[1:])
    assert m.sweeps_expanded == 4


def test_after_naming_a_sweep_waits_for_all_its_jobs():
    m = parse("""
        [[sweeps]]
        name = "grid"
        model = "mlp"
        mode = "train"
        seed = [0, 1, 2]
        [[jobs]]
        model = "mlp"
        mode = "report"
        after = ["grid", "grid-1"]
    """)
    assert m.jobs[0].mode == "report"  # [[jobs]] come before [[sweeps]], whatever the file's order
    assert m.jobs[0].after == ("grid-0", "grid-1", "grid-2")


def test_list_valued_sweep_name_is_refused():
    assert only_problem("""
        [[sweeps]]
        model = "mlp"
        mode = "train"
        name = ["a", "b"]
    """) == (f"{SRC}: sweeps[0] (model=mlp).name: a sweep's name cannot be a list: it is the prefix of its jobs' "
             "names (<name>-<index>); give one string")


def test_empty_sweep_list_is_refused():
    assert only_problem('[[sweeps]]\nmodel = "mlp"\nmode = "train"\nseed = []\n') == \
        f"{SRC}: sweeps[0] (model=mlp).seed: an empty list expands to no jobs; give at least one value"


def test_list_in_a_plain_job_points_to_sweeps():
    assert only_problem('[[jobs]]\nmodel = "mlp"\nmode = "train"\nseed = [1, 2]\n') == \
        (f"{SRC}: jobs[0] (model=mlp).seed: expected one value, got [1, 2]; "
         "to train several values, use a [[sweeps]] entry")


def test_list_valued_hyper_in_a_plain_job_is_one_value():
    (job,) = parse('[[jobs]]\nmodel = "mlp"\nmode = "train"\nhyper = { hidden = [64, 64] }\n').jobs
    assert job.hyper == {"hidden": [64, 64]}


def test_a_huge_sweep_is_refused_before_expanding():
    axis = "[" + ", ".join(str(i) for i in range(100)) + "]"
    text = f'[[sweeps]]\nmodel = "mlp"\nmode = "train"\nseed = {axis}\nhyper = {{ a = {axis}, b = {axis} }}\n'
    assert only_problem(text) == \
        f"{SRC}: sweeps[0] (model=mlp): expands to 1000000 jobs, more than 10000; split it into smaller sweeps"


# -- syntax and files --


def test_toml_syntax_error_gives_line_and_column():
    assert only_problem('[[jobs]]\nmodel = "mlp"\nmode = \n') == \
        f"{SRC}: line 3, column 8: invalid TOML: Invalid value"


def test_toml_syntax_error_at_end_of_file_gives_last_line():
    assert only_problem('[[jobs]]\nmodel = "mlp"\nmode = ') == f"{SRC}: line 3, column 8: invalid TOML: Invalid value"


def test_duplicate_toml_key_is_a_syntax_error():
    (msg,) = problems('[[jobs]]\nmodel = "mlp"\nmodel = "x"\nmode = "train"\n')
    assert msg.startswith(f"{SRC}: line ") and "invalid TOML: Cannot overwrite a value" in msg


def test_missing_file_is_one_clear_problem(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    assert info.value.problems == [f"{path}: no such file; check the path "
                                   "(etc/training_manifest.toml.example is a complete example)"]


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ManifestError, match="is a directory; give the path of the manifest file"):
        manifest.load(tmp_path)


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "m.toml"
    path.write_bytes(b'[[jobs]]\nmodel = "\xff"\n')
    with pytest.raises(ManifestError, match=r"not UTF-8 text \(bad byte at offset 18\); save it as UTF-8"):
        manifest.load(path)


def test_load_names_the_file_and_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "m.toml"
    path.write_bytes(b"\xef\xbb\xbf" + JOB.encode())
    m = manifest.load(path)
    assert m.source == str(path) and len(m.jobs) == 1
    path.write_text(JOB + "min_ram_gib = -1\n", encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    assert info.value.problems == [f"{path}: jobs[0] (model=mlp).min_ram_gib: expected a number >= 0, got -1"]


# -- one test per class of error --


def test_the_message_from_the_style_guide():
    text = "".join(f"{JOB}seed = {i}\n" for i in range(3)) + JOB + "min_vram_gib = -2\n"
    assert only_problem(text) == "training_manifest.toml: jobs[3] (model=mlp).min_vram_gib: expected a number >= 0, got -2"


@pytest.mark.parametrize("text,where,typo,suggestion", [
    (JOB + "requre_cuda = true\n", "jobs[0] (model=mlp)", "requre_cuda", "require_cuda"),
    ("[[job]]\nmodel = 'mlp'\n", "", "job", "jobs"),
    ("[fleet]\nheartbeat = 10\n", "fleet", "heartbeat", "heartbeat_s"),
    ("[[fleet.peers]]\nid = 'a'\nurl = 'http://a'\nuri = 'x'\n", "fleet.peers[0] (id=a)", "uri", "url"),
    ("[trainer]\ncommnd = ['x']\n", "trainer", "commnd", "command"),
    ("[[hosts]]\nid = 'a'\nslot = 2\n", "hosts[0] (id=a)", "slot", "slots"),
    ("[[hosts]]\nid = 'a'\ncapability = { vram = 8 }\n", "hosts[0] (id=a).capability", "vram", "vram_gib"),
    ("[[hosts]]\nid = 'a'\ncapability = { gpus = [{ vram_gib = 8, nmae = 'x' }] }\n",
     "hosts[0] (id=a).capability.gpus[0]", "nmae", "name"),
    ('[[sweeps]]\nmodel = "mlp"\nmode = "train"\nsed = [1, 2]\n', "sweeps[0] (model=mlp)", "sed", "seed"),
])
def test_unknown_key_suggests_the_closest(text, where, typo, suggestion):
    prefix = f"{SRC}: {where}: " if where else f"{SRC}: "
    assert f"{prefix}unknown key {typo!r}; did you mean {suggestion!r}?" in problems(text)


def test_unknown_key_without_a_close_match_lists_the_known_ones():
    assert only_problem("[fleet]\ncolour = 'red'\n") == (
        f"{SRC}: fleet: unknown key 'colour'; known keys: name, peers, stale_after_s, heartbeat_s, max_attempts, "
        "max_artifact_bytes, retry_backoff_s, worker_timeout_s, checkpoint_every_s, retries, max_runtime_s, "
        "stall_after_s")


@pytest.mark.parametrize("line,field,message", [
    ("min_vram_gib = true", "min_vram_gib", "expected a number >= 0, got true (a boolean is not a number)"),
    ("min_ram_gib = '4'", "min_ram_gib", 'expected a number >= 0, got "4"'),
    ("require_cuda = 'yes'", "require_cuda", 'expected true or false, got "yes"'),
    ("prefer_cuda = 1", "prefer_cuda", "expected true or false, got 1"),
    ("seed = 1.5", "seed", "expected an integer, got 1.5"),
    ("seed = false", "seed", "expected an integer, got false"),
    ("priority = 2.0", "priority", "expected an integer, got 2.0"),
    ("split_recipe = 3", "split_recipe", "expected a non-empty string, got 3"),
    ("train_hosts = 'a'", "train_hosts", 'expected a list of strings, got "a"'),
    ("train_hosts = ['a', 2]", "train_hosts[1]", "expected a non-empty string, got 2"),
    ("allowed_hosts = 'ws'", "allowed_hosts", 'expected a list of strings, got "ws"'),
    ("hyper = 3", "hyper", "expected a table, got 3"),
    ("after = 'prep'", "after", 'expected a list of strings, got "prep"'),
    ("hyper = { when = 2024-01-02 }", "hyper.when",
     "expected a string, number, boolean, array or table, got a date/time (2024-01-02) "
     "(dates and times have no JSON form; quote them)"),
])
def test_wrong_types(line, field, message):
    assert only_problem(JOB + line + "\n") == f"{SRC}: jobs[0] (model=mlp).{field}: {message}"


@pytest.mark.parametrize("text,message", [
    ('[[jobs]]\nmode = "train"\n', "jobs[0]: missing required key 'model'"),
    ('[[jobs]]\nmodel = "mlp"\n', "jobs[0] (model=mlp): missing required key 'mode'"),
    ('[[jobs]]\nmodel = "my model"\nmode = "train"\n',
     "jobs[0] (model=my model).model: \"my model\" is not allowed here: use 1-128 letters, digits, '.', '_' or '-', "
     "starting with a letter or digit"),
    ('[[jobs]]\nmodel = "../x"\nmode = "train"\n',
     "jobs[0] (model=../x).model: \"../x\" is not allowed here: use 1-128 letters, digits, '.', '_' or '-', "
     "starting with a letter or digit"),
    ('[jobs]\nmodel = "mlp"\n',
     "jobs: expected an array of tables ([[jobs]]), got a single table ([jobs]); write [[jobs]] above each entry"),
    ("jobs = [1]\n", "jobs[0]: expected a table, got 1"),
    ("fleet = 3\n", "fleet: expected a table, got 3"),
    ("[[hosts]]\nslots = 1\n", "hosts[0]: missing required key 'id'"),
    ("[[hosts]]\nid = 'a b'\n", "hosts[0] (id=a b).id: \"a b\" is not allowed here: use 1-63 letters, digits, '.', "
                                "'_' or '-', starting with a letter or digit"),
    ("[[hosts]]\nid = 'a'\nrole = 'boss'\n", "hosts[0] (id=a).role: expected one of worker, coordinator, both, "
                                             "got \"boss\""),
    ("[[hosts]]\nid = 'a'\ncapability = { cuda = 'no' }\n",
     "hosts[0] (id=a).capability.cuda: expected true or false, got \"no\""),
    ("[[hosts]]\nid = 'a'\ncapability = { gpus = [{ name = 'x' }] }\n",
     "hosts[0] (id=a).capability.gpus[0]: missing required key 'vram_gib'"),
    ("[[fleet.peers]]\nid = 'a'\nurl = 'pi:8445'\n",
     "fleet.peers[0] (id=a).url: expected an http:// or https:// URL, got \"pi:8445\""),
    ("[[fleet.peers]]\nid = 'a'\nurl = 'http://a'\n[[fleet.peers]]\nid = 'a'\nurl = 'http://b'\n",
     "fleet.peers[1] (id=a).id: duplicate peer id 'a' (also fleet.peers[0] (id=a)); each peer appears once"),
    ("[fleet]\nmax_attempts = 0\n", "fleet.max_attempts: expected an integer >= 1, got 0"),
    ("[fleet]\nheartbeat_s = 0\n", "fleet.heartbeat_s: expected a number > 0, got 0"),
    ("[trainer]\ncommand = []\n", "trainer.command: expected the trainer's argv, got an empty list"),
    ("[trainer]\ncommand = 'python train.py'\n", "trainer.command: expected a list of strings, got \"python "
                                                  "train.py\""),
    ("[trainer]\nhyper_keys = { mlp = 'lr' }\n", "trainer.hyper_keys.mlp: expected a list of strings, got \"lr\""),
])
def test_other_structural_errors(text, message):
    assert only_problem(text) == f"{SRC}: {message}"


@pytest.mark.parametrize("line,field,message", [
    ("min_vram_gib = -2", "min_vram_gib", "expected a number >= 0, got -2"),
    ("min_ram_gib = -0.5", "min_ram_gib", "expected a number >= 0, got -0.5"),
    ("retries = -1", "retries", "expected an integer >= 0, got -1"),
])
def test_negative_sizes(line, field, message):
    assert only_problem(JOB + line + "\n") == f"{SRC}: jobs[0] (model=mlp).{field}: {message}"


@pytest.mark.parametrize("line,field,message", [
    ("max_runtime_s = 0", "max_runtime_s", "expected a number > 0, got 0"),
    ("stall_after_s = -5", "stall_after_s", "expected a number > 0, got -5"),
    ("stall_after_s = 'soon'", "stall_after_s", 'expected a number > 0, got "soon"'),
])
def test_time_limits_of_a_job_are_positive_numbers(line, field, message):
    assert only_problem(JOB + line + "\n") == f"{SRC}: jobs[0] (model=mlp).{field}: {message}"


@pytest.mark.parametrize("line,message", [
    ("max_runtime_s = 0", "fleet.max_runtime_s: expected a number > 0, got 0"),
    ("stall_after_s = true", "fleet.stall_after_s: expected a number > 0, got true (a boolean is not a number)"),
    ("retries = -1", "fleet.retries: expected an integer >= 0, got -1"),
])
def test_fleet_time_limits_and_retries_are_checked(line, message):
    assert only_problem("[fleet]\n" + line + "\n") == f"{SRC}: {message}"


def test_fleet_defaults_for_time_limits_and_retries():
    m = manifest.parse("[fleet]\nretries = 2\nmax_runtime_s = 3600\nstall_after_s = 300\n" + JOB
                       + "\n[[jobs]]\nmodel = 'mlp'\nmode = 'b'\nmax_runtime_s = 60\nretries = 0\n", SRC)
    plain, limited = m.jobs
    assert (m.fleet.max_runtime_s, m.fleet.stall_after_s) == (3600.0, 300.0)
    assert (plain.max_runtime_s, limited.max_runtime_s, limited.stall_after_s) == (None, 60.0, None)
    assert (plain.fault_tries(m.fleet), limited.fault_tries(m.fleet)) == (3, 1)
    assert manifest.parse(JOB, SRC).fleet.retries == 0  # a trainer's failure is final unless granted


def test_host_slots_must_be_positive():
    assert only_problem("[[hosts]]\nid = 'a'\nslots = 0\n") == \
        f"{SRC}: hosts[0] (id=a).slots: expected an integer >= 1, got 0"
    assert only_problem("[[hosts]]\nid = 'a'\ncapability = { vram_gib = -8 }\n") == \
        f"{SRC}: hosts[0] (id=a).capability.vram_gib: expected a number >= 0, got -8"


@pytest.mark.parametrize("value,shown", [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf")])
def test_nan_and_infinity(value, shown):
    found = problems(f"{JOB}min_vram_gib = {value}\nhyper = {{ lr = {value}, layers = [1.0, {value}] }}\n")
    assert found == [
        f"{SRC}: jobs[0] (model=mlp).hyper.lr: {shown} is not allowed: NaN and infinity have no job id encoding; "
        "give a finite number",
        f"{SRC}: jobs[0] (model=mlp).hyper.layers[1]: {shown} is not allowed: NaN and infinity have no job id "
        "encoding; give a finite number",
        f"{SRC}: jobs[0] (model=mlp).min_vram_gib: expected a number >= 0, got {shown} "
        "(NaN and infinity are not allowed)",
    ]


def test_stale_window_must_cover_three_heartbeats():
    assert only_problem("[fleet]\nheartbeat_s = 30\nstale_after_s = 60\n") == (
        f"{SRC}: fleet.stale_after_s: 60 is less than 3 * heartbeat_s (3 * 30 = 90): a worker that misses two "
        "heartbeats would lose its job; raise stale_after_s or lower heartbeat_s")
    assert parse("[fleet]\nheartbeat_s = 0.5\nstale_after_s = 1.5\n").fleet.stale_after_s == 1.5


def test_duplicate_job_ids_name_both_entries():
    text = JOB * 2 + 'hyper = { lr = 0.1 }\n' + JOB + 'hyper = { lr = 0.01 }\nseed = 1\n' + """
        [[sweeps]]
        model = "mlp"
        mode = "train"
        seed = [0, 1]
        hyper = { lr = [1.0, 0.1, 1e-2] }
    """
    dup = compute_job_id("mlp", "train", {"lr": 0.01}, "default", [], 1)
    found = problems(textwrap.dedent(text))
    assert found == [
        f"{SRC}: sweeps[0][1] (model=mlp): the same job as jobs[1] (model=mlp) (id {compute_job_id('mlp', 'train', {'lr': 0.1}, 'default', [], 0)[:12]}): "
        "model, mode, hyper, split_recipe, train_hosts and seed are all equal; change one of them (e.g. seed) or "
        "remove one entry",
        f"{SRC}: sweeps[0][5] (model=mlp): the same job as jobs[2] (model=mlp) (id {dup[:12]}): "
        "model, mode, hyper, split_recipe, train_hosts and seed are all equal; change one of them (e.g. seed) or "
        "remove one entry",
    ]


@pytest.mark.parametrize("first,second", [("lr = 1e-3", "lr = 0.001"), ("epochs = 10", "epochs = 10.0"),
                                          ("a = 1, b = 2", "b = 2, a = 1")])
def test_spellings_of_one_value_are_one_job(first, second):
    found = problems(f"{JOB}hyper = {{ {first} }}\n{JOB}hyper = {{ {second} }}\n")
    assert len(found) == 1 and found[0].startswith(f"{SRC}: jobs[1] (model=mlp): the same job as jobs[0] (model=mlp)")


def test_duplicate_host_ids():
    assert only_problem("[[hosts]]\nid = 'ws'\n[[hosts]]\nid = 'pi'\n[[hosts]]\nid = 'ws'\nslots = 2\n") == \
        f"{SRC}: hosts[2] (id=ws).id: duplicate host id 'ws' (also hosts[0] (id=ws)); merge the two [[hosts]] entries"


def test_unknown_hosts_in_allowed_hosts():
    text = "[[hosts]]\nid = 'ws-a'\n[[hosts]]\nid = 'pi'\n" + JOB + "allowed_hosts = ['ws-a', 'ws-b', 'gpu9']\n"
    assert problems(text) == [
        f"{SRC}: jobs[0] (model=mlp).allowed_hosts[1]: unknown host 'ws-b'; did you mean 'ws-a'?",
        f"{SRC}: jobs[0] (model=mlp).allowed_hosts[2]: unknown host 'gpu9'; declared [[hosts]]: ws-a, pi",
    ]


def test_allowed_hosts_without_declared_hosts_need_only_valid_ids():
    assert parse(JOB + "allowed_hosts = ['anything']\n").jobs[0].allowed_hosts == ("anything",)
    assert "not allowed here" in only_problem(JOB + "allowed_hosts = ['no/slash']\n")


def test_unknown_after_names():
    text = JOB + "name = 'prep'\n" + JOB + "hyper = { lr = 1 }\nafter = ['prpe', 'zzz']\n"
    assert problems(text) == [
        f"{SRC}: jobs[1] (model=mlp).after[0]: no job or sweep is named 'prpe'; did you mean 'prep'?",
        f"{SRC}: jobs[1] (model=mlp).after[1]: no job or sweep is named 'zzz'; known names: prep",
    ]


def test_after_cycle_is_named():
    text = """
        [[jobs]]
        name = "a"
        model = "mlp"
        mode = "train"
        after = ["c"]
        [[jobs]]
        name = "b"
        model = "mlp"
        mode = "eval"
        after = ["a"]
        [[jobs]]
        name = "c"
        model = "mlp"
        mode = "test"
        after = ["b"]
        [[jobs]]
        name = "free"
        model = "logreg"
        mode = "train"
        after = ["a"]
    """
    assert problems(text) == [
        f"{SRC}: jobs[0] (model=mlp, name=a).after: dependency cycle a -> c -> b -> a: none of these jobs can ever "
        "start; remove one of these 'after' entries"]


def test_a_job_cannot_wait_for_itself():
    assert only_problem(JOB + "name = 'me'\nafter = ['me']\n") == \
        f"{SRC}: jobs[0] (model=mlp, name=me).after: a job cannot wait for itself; remove its own name from 'after'"
    assert only_problem('[[sweeps]]\nname = "s"\nmodel = "mlp"\nmode = "train"\nseed = [1, 2]\nafter = ["s"]\n') == \
        f"{SRC}: sweeps[0] (model=mlp, name=s).after: a job cannot wait for itself; remove its own name from 'after'"


def test_cycle_through_a_broken_entry_is_still_found():
    found = problems(JOB + "name = 'a'\nafter = ['b']\nmin_ram_gib = -1\n" + JOB + "seed = 1\nname = 'b'\nafter = ['a']\n")
    assert len(found) == 2 and "dependency cycle a -> b -> a" in found[1]


def test_duplicate_names():
    assert only_problem(JOB + "name = 'x'\n" + JOB + "seed = 1\nname = 'x'\n") == \
        f"{SRC}: jobs[1] (model=mlp, name=x).name: duplicate name 'x' (also jobs[0] (model=mlp, name=x)); " \
        "names must be unique"
    assert only_problem(JOB + "name = 's-1'\n" + '[[sweeps]]\nname = "s"\nmodel = "mlp"\nmode = "x"\nseed = [1, 2]\n') == \
        f"{SRC}: sweeps[0] (model=mlp, name=s).name: duplicate name 's-1' (also jobs[0] (model=mlp, name=s-1)); " \
        "names must be unique"
    assert only_problem(JOB + "name = 's'\n" + '[[sweeps]]\nname = "s"\nmodel = "mlp"\nmode = "x"\nseed = [1, 2]\n') == \
        f"{SRC}: sweeps[0] (model=mlp, name=s).name: 's' is also the name of jobs[0] (model=mlp, name=s); " \
        "'after' could not tell them apart: rename one"


def test_hyper_keys_the_trainer_does_not_accept():
    text = """
        [trainer.hyper_keys]
        mlp = ["lr", "epochs", "hidden"]
        "*" = ["batch_size"]
        [[jobs]]
        model = "mlp"
        mode = "train"
        hyper = { lr = 0.1, epoch = 3, batch_size = 8 }
        [[jobs]]
        model = "gbt"
        mode = "train"
        hyper = { depth = 3 }
    """
    assert problems(text) == [
        f"{SRC}: jobs[0] (model=mlp).hyper.epoch: the trainer does not accept hyper key 'epoch' for model 'mlp' "
        "(per trainer.hyper_keys); did you mean 'epochs'?",
        f"{SRC}: jobs[1] (model=gbt).hyper.depth: the trainer does not accept hyper key 'depth' for model 'gbt' "
        "(per trainer.hyper_keys); it accepts: batch_size",
    ]


def test_models_without_declared_hyper_keys_are_unchecked():
    text = '[trainer.hyper_keys]\nmlp = ["lr"]\n[[jobs]]\nmodel = "custom"\nmode = "x"\nhyper = { anything = 1 }\n'
    assert parse(text).jobs[0].hyper == {"anything": 1}


def test_describe_table_replaces_trainer_hyper_keys():
    text = '[trainer.hyper_keys]\nmlp = ["lr"]\n' + JOB + "hyper = { lr = 0.1, hidden = 4 }\n" + \
        '[[sweeps]]\nmodel = ["mlp", "gbt"]\nmode = "train"\nseed = 1\n'
    assert problems(text, describe=None) == [
        f"{SRC}: jobs[0] (model=mlp).hyper.hidden: the trainer does not accept hyper key 'hidden' for model 'mlp' "
        "(per trainer.hyper_keys); it accepts: lr"]
    assert problems(text, describe={"mlp": ["lr", "hidden"], "logreg": []}) == [
        f"{SRC}: sweeps[0].model: the trainer does not know model 'gbt'; it describes: logreg, mlp"]
    assert len(parse(text, describe={"mlp": ["lr", "hidden"], "gbt": []}).jobs) == 3
    assert problems(JOB + "hyper = { lr = 1 }\n", describe={"mlp": []}) == [
        f"{SRC}: jobs[0] (model=mlp).hyper.lr: the trainer does not accept hyper key 'lr' for model 'mlp' "
        "(per the trainer's describe output); it accepts none"]


@pytest.mark.parametrize("arg,message", [
    ("{seeed}", "unknown placeholder {seeed}; did you mean 'seed'?"),
    ("{}", "unknown placeholder {}; known placeholders: python, model, mode, hyper, seed, split_recipe, "
           "train_hosts, out"),
    ("{hyper.lr}", "unknown placeholder {hyper.lr}; did you mean 'hyper'?"),
    ("--x={model", "\"--x={model\" is not a valid template (expected '}' before end of string); write {{ and }} "
                   "for literal braces"),
])
def test_trainer_command_placeholders(arg, message):
    assert only_problem(f"[trainer]\ncommand = ['{{python}}', '{arg}']\n") == f"{SRC}: trainer.command[1]: {message}"


def test_describe_command_takes_only_python():
    assert only_problem("[trainer]\ndescribe = ['{python}', '{model}']\n") == \
        f"{SRC}: trainer.describe[1]: unknown placeholder {{model}}; known placeholders: python"


def test_every_problem_is_reported_at_once():
    text = """
        [fleet]
        heartbeat_s = 30
        stale_after_s = 30
        colour = "red"
        [[hosts]]
        id = "ws"
        [[hosts]]
        id = "ws"
        [[jobs]]
        model = "mlp"
        mode = "train"
        requre_cuda = true
        min_vram_gib = -2
        allowed_hosts = ["pi"]
        after = ["nothing"]
        [[sweeps]]
        model = "mlp"
        mode = "train"
        seed = []
        name = ["x"]
    """
    found = problems(text)
    assert len(found) == 9, found
    assert all(line.startswith(f"{SRC}: ") for line in found)
    assert [line.split(": ")[1] for line in found] == [
        "fleet", "fleet.stale_after_s", "hosts[1] (id=ws).id", "jobs[0] (model=mlp)", "jobs[0] (model=mlp).min_vram_gib",
        "jobs[0] (model=mlp).allowed_hosts[0]", "sweeps[0] (model=mlp).seed", "sweeps[0] (model=mlp).name",
        "jobs[0] (model=mlp).after[0]"]


def test_the_source_names_the_file():
    assert only_problem(JOB + "seed = 'x'\n", source="lab.toml") == \
        'lab.toml: jobs[0] (model=mlp).seed: expected an integer, got "x"'


# -- properties --

_scalars = st.one_of(st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True, width=32),
                     st.sampled_from(["mlp", "train", "", "a b", "ws-a", "*", "{model}", "1e-3"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.sampled_from(["lr", "x", "id"]), inner,
                                                                         max_size=2)), max_leaves=6)
_keys = st.sampled_from(list(manifest.JOB_KEYS) + ["requre_cuda", "modle", "id", "url", "slots", "capability",
                                                   "command", "heartbeat_s"])


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["jobs", "sweeps", "hosts", "fleet.peers"]),
                          st.dictionaries(_keys, _values, max_size=6)), max_size=4),
       st.dictionaries(st.sampled_from(["heartbeat_s", "stale_after_s", "name", "max_attempts"]), _values, max_size=3))
def test_any_input_is_a_manifest_or_a_list_of_problems(entries, fleet):
    text = "[fleet]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in fleet.items())
    for table, body in entries:
        text += f"[[{table}]]\n" + "".join(f"{json.dumps(k)} = {_toml(v)}\n" for k, v in body.items())
    try:
        m = manifest.parse(text)
    except ManifestError as err:
        assert err.problems and all(p.startswith(f"{SRC}: ") and "\n" not in p for p in err.problems)
    else:
        assert len({j.id for j in m.jobs}) == len(m.jobs)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('[]{}="\'\n .,-_#0123456789abjosmdelnfur')), max_size=80))
def test_any_text_is_a_manifest_or_a_list_of_problems(text):
    try:
        manifest.parse(text)
    except ManifestError as err:
        assert err.problems and all(p.startswith(f"{SRC}: ") and "\n" not in p for p in err.problems)


@given(st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True),
       st.lists(st.sampled_from([0.1, 0.01, 0.001, 1.0]), min_size=1, max_size=4, unique=True),
       st.lists(st.sampled_from(["train", "eval", "test"]), min_size=1, max_size=3, unique=True))
def test_sweep_size_is_the_product_and_ids_are_unique(seeds, lrs, modes):
    text = (f'[[sweeps]]\nname = "g"\nmodel = "mlp"\nmode = {_toml(modes)}\nseed = {_toml(seeds)}\n'
            f"hyper = {{ lr = {_toml(lrs)} }}\n")
    m = manifest.parse(text)
    assert len(m.jobs) == m.sweeps_expanded == len(seeds) * len(lrs) * len(modes)
    assert len({j.id for j in m.jobs}) == len(m.jobs)
    assert [j.name for j in m.jobs] == [f"g-{i}" for i in range(len(m.jobs))]
    assert manifest.parse(text) == m


# -- the command: manifest check | ids --


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cis490fleet", "manifest", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_check_of_the_example_exits_0_with_a_summary():
    proc = run_cli("check", "etc/training_manifest.toml.example")
    assert proc.returncode == 0, proc.stderr
    m = manifest.load(EXAMPLE)
    assert proc.stdout.splitlines()[0] == "etc/training_manifest.toml.example: ok"
    assert f"  jobs:   {len(m.jobs)} " in proc.stdout
    assert "  hosts:  4 (pi, ws-a, ws-b, win-cpu)" in proc.stdout
    assert f"  sweeps expanded: {m.sweeps_expanded}" in proc.stdout
    assert "  models: gbt 1, logreg " in proc.stdout and ", mlp " in proc.stdout
    assert "hyper keys checked against: trainer.hyper_keys" in proc.stdout


def test_check_of_a_bad_file_exits_1_with_every_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(JOB + "requre_cuda = true\nmin_vram_gib = -2\n[[hosts]]\nid = 'x'\n[[hosts]]\nid = 'x'\n")
    proc = run_cli("check", str(bad))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"{bad}: hosts[1] (id=x).id: duplicate host id 'x' (also hosts[0] (id=x)); merge the two [[hosts]] entries",
        f"{bad}: jobs[0] (model=mlp): unknown key 'requre_cuda'; did you mean 'require_cuda'?",
        f"{bad}: jobs[0] (model=mlp).min_vram_gib: expected a number >= 0, got -2",
        f"cis490fleet manifest: 3 problems in {bad}; fix them and run again",
    ]
    assert "Traceback" not in proc.stderr


def test_check_of_a_missing_file_is_one_line(tmp_path, capsys):
    assert manifest_cmd.main(["check", str(tmp_path / "nope.toml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err


def test_ids_prints_one_line_per_job(capsys):
    assert manifest_cmd.main(["ids", str(EXAMPLE)]) == 0
    lines = capsys.readouterr().out.splitlines()
    m = manifest.load(EXAMPLE)
    assert lines == [f"{j.id} {j.model} {j.mode}" for j in m.jobs]


def test_usage_errors_exit_2(capsys):
    assert manifest_cmd.main([]) == 2
    assert manifest_cmd.main(["lint", "x"]) == 2
    assert "usage: cis490fleet manifest" in capsys.readouterr().err


def _with_describe(tmp_path: Path, script: str, job: str = JOB) -> Path:
    (tmp_path / "describe.py").write_text(textwrap.dedent(script))
    path = tmp_path / "m.toml"
    path.write_text(f"[trainer]\ndescribe = [{json.dumps('{python}')}, {json.dumps(str(tmp_path / 'describe.py'))}]\n"
                    + job)
    return path


def test_check_describe_uses_the_trainers_table(tmp_path, capsys):
    path = _with_describe(tmp_path, 'import json; print(json.dumps({"mlp": ["lr", "epochs"]}))',
                          JOB + "hyper = { lr = 0.1, epcohs = 2 }\n")
    assert manifest_cmd.main(["check", str(path)]) == 0  # unchecked without --describe
    capsys.readouterr()
    assert manifest_cmd.main(["check", str(path), "--describe"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: jobs[0] (model=mlp).hyper.epcohs: the trainer does not accept hyper key 'epcohs' for model 'mlp' "
        "(per the trainer's describe output); did you mean 'epochs'?"]


def test_check_describe_success_says_what_it_checked(tmp_path, capsys):
    path = _with_describe(tmp_path, 'print(\'{"models": {"mlp": {"hyper_keys": ["lr"]}}}\')',
                          JOB + "hyper = { lr = 0.1 }\n")
    assert manifest_cmd.main(["check", str(path), "--describe"]) == 0
    assert "hyper keys checked against: the trainer's describe output" in capsys.readouterr().out


@pytest.mark.parametrize("script,expected", [
    ("import sys; sys.exit('describe broke')", "exited with status 1"),
    ("print('not json')", "printed no JSON"),
    ("print('[1, 2]')", "printed list JSON; expected"),
    ("print('{\"mlp\": 3}')", "gave model 'mlp' 3; expected a list of hyper key names"),
    ("import time; time.sleep(60)", "did not finish within 0.5 s"),
])
def test_check_describe_failures_are_one_line(tmp_path, capsys, script, expected):
    path = _with_describe(tmp_path, script)
    assert manifest_cmd.main(["check", str(path), "--describe", "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cis490fleet manifest: the trainer's describe command")
    assert expected in err


def test_check_describe_without_a_describe_command():
    from cis490fleet.errors import FleetError

    with pytest.raises(FleetError, match=r"has no describe command; add one such as describe = "):
        manifest_cmd.run_describe(TrainerConfig(command=("{python}", "train.py", "{out}")))


def test_check_describe_asks_the_built_in_trainer(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(JOB + "hyper = { lr = 0.1, hiden = 8 }\n")  # default [trainer]: the built-in one
    proc = run_cli("check", str(path), "--describe")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"{path}: jobs[0] (model=mlp).hyper.hiden: the trainer does not accept hyper key 'hiden' for model 'mlp' "
        "(per the trainer's describe output); did you mean 'hidden'?"]


def test_check_describe_of_the_example_with_the_built_in_trainer():
    proc = run_cli("check", "etc/training_manifest.toml.example", "--describe")
    assert proc.returncode == 0, proc.stderr
    assert "hyper keys checked against: the trainer's describe output" in proc.stdout
