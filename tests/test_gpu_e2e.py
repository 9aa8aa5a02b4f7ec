"""GPUs end to end: a real `serve`, real `work` processes and a stand-in `nvidia-smi` reporting GPUs of
different VRAM. The worker runs the slots the coordinator says; each job gets the GPUs its claim was given."""

from __future__ import annotations

import os
import re

import pytest

from conftest import wait_for
from test_e2e import jobs_by_name, jobs_cli, workers  # noqa: F401 (fixture)
from test_worker import fake_nvidia_smi, trainer_manifest

from cis490fleet.client import Client

pytestmark = pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals and a stand-in nvidia-smi script")


def job(name: str, steps: int = 30, sleep: float = 0.1, extra: str = "", hyper: str = "") -> str:
    return f"""
        [[jobs]]
        name = "{name}"
        model = "mlp"
        mode = "{name}"
        hyper = {{ steps = {steps}, sleep = {sleep}{hyper} }}
        {extra}
    """


def running_at_once(client: Client, names: set[str]) -> bool:
    jobs = jobs_by_name(client)
    return all(jobs[n]["status"] == "running" for n in names)


def test_a_host_declared_with_two_slots_runs_two_jobs_at_once(serve_process, workers, tmp_path):  # noqa: F811
    server = serve_process(manifest=trainer_manifest("devices.py", """
        [[hosts]]
        id = "ws-a"
        slots = 2
    """ + job("first") + job("second")))
    fake_nvidia_smi(tmp_path, [])  # a CPU host: on its own it would run one slot
    w = workers(server.url, "ws-a")
    client = Client(server.url)
    wait_for("both jobs running at once", lambda: running_at_once(client, {"first", "second"}), timeout=60)
    assert "the coordinator runs 2 slot(s) here: ['cpu', 'cpu']" in w.log_text()
    table = jobs_cli(server.url, "workers").stdout
    assert "ws-a" in table and "2/2" in table
    wait_for("both jobs completed", lambda: {j["status"] for j in jobs_by_name(client).values()} == {"completed"},
             timeout=60)


def test_each_job_lands_on_the_card_it_fits_and_sees_only_its_gpus(serve_process, workers, tmp_path):  # noqa: F811
    server = serve_process(manifest=trainer_manifest("devices.py", job(
        "big", steps=20, extra="require_cuda = true\nmin_vram_gib = 16", hyper=", peak_vram_gib = 14.5") + job(
        "small", steps=20, extra="require_cuda = true\nmin_vram_gib = 6")))
    # The 8 GiB card is listed first: the 16 GiB job must still end on the 24 GiB one.
    fake_nvidia_smi(tmp_path, [(0, "RTX 3070", 8192), (1, "RTX 4090", 24576)])
    workers(server.url, "ws-gpu")
    client = Client(server.url)
    wait_for("both jobs completed", lambda: {j["status"] for j in jobs_by_name(client).values()} == {"completed"},
             timeout=60)
    big = client.job(jobs_by_name(client)["big"]["id"])["job"]
    small = client.job(jobs_by_name(client)["small"]["id"])["job"]
    assert big["attempts"][-1]["gpus"] == [1] and small["attempts"][-1]["gpus"] == [0]
    assert "CUDA_VISIBLE_DEVICES='1' CIS490_GPUS='1'" in big["log_tail"]
    assert "CUDA_VISIBLE_DEVICES='0' CIS490_GPUS='1'" in small["log_tail"]
    assert big["peak_vram_gib"] == 14.5
    shown = jobs_cli(server.url, "show", big["id"]).stdout
    assert re.search(r"peak VRAM +14.50 GiB \(measured by the trainer\)", shown), shown
    assert re.search(r"GPUS +STARTED.*\n +1 +ws-gpu +1 ", shown), shown


def test_a_two_gpu_job_gets_both_cards_in_cuda_visible_devices(serve_process, workers, tmp_path):  # noqa: F811
    server = serve_process(manifest=trainer_manifest("devices.py", job("ddp", steps=15, extra="gpus = 2")))
    fake_nvidia_smi(tmp_path, [(0, "A100", 40960), (1, "A100", 40960)])
    workers(server.url, "ws-two")
    client = Client(server.url)
    wait_for("the job completed", lambda: jobs_by_name(client)["ddp"]["status"] == "completed", timeout=60)
    detail = client.job(jobs_by_name(client)["ddp"]["id"])["job"]
    assert sorted(detail["attempts"][-1]["gpus"]) == [0, 1]
    assert "CIS490_GPUS='2'" in detail["log_tail"]


def test_a_reload_that_raises_a_hosts_slots_reaches_the_running_worker(serve_process, workers, tmp_path):  # noqa: F811
    host = """
        [[hosts]]
        id = "ws-r"
        slots = {slots}
    """
    jobs = job("a", steps=20) + job("b", steps=40) + job("c", steps=40)
    server = serve_process(manifest=trainer_manifest("devices.py", host.format(slots=1) + jobs))
    fake_nvidia_smi(tmp_path, [])
    w = workers(server.url, "ws-r", "--slots", "1")
    client = Client(server.url)
    wait_for("job a running", lambda: jobs_by_name(client)["a"]["status"] == "running", timeout=60)
    assert jobs_by_name(client)["b"]["status"] == "pending"
    (server.data_dir.parent / "manifest.toml").write_text(trainer_manifest("devices.py", host.format(slots=2) + jobs))
    assert jobs_cli(server.url, "reload").returncode == 0
    wait_for("b and c running at once", lambda: running_at_once(client, {"b", "c"}), timeout=60)
    assert "the coordinator now counts 2 slot(s) here" in w.log_text()


def test_a_slow_host_leaves_a_job_to_a_faster_busy_one_and_jobs_show_says_why(serve_process, workers,  # noqa: F811
                                                                              tmp_path):
    server = serve_process(manifest=trainer_manifest("devices.py", """
        [[hosts]]
        id = "fast"
        speed = 10.0

        [[hosts]]
        id = "slow"
        speed = 0.1
    """ + job("long", steps=40, extra="expected_minutes = 10") + job("short", steps=5, extra="expected_minutes = 1")))
    fake_nvidia_smi(tmp_path, [])
    client = Client(server.url)
    workers(server.url, "fast")
    wait_for("the long job running on fast", lambda: jobs_by_name(client)["long"].get("host") == "fast", timeout=60)
    slow = workers(server.url, "slow")
    wait_for("slow to register", lambda: any(w["host"] == "slow" for w in client.workers()["workers"]), timeout=60)
    shown = jobs_cli(server.url, "show", "short").stdout
    assert re.search(r"slow: waits for a faster host: fast is expected to start it in \S+ and finish it in \S+, "
                     r"sooner than slow would \(here: 10m00s\)", shown), shown
    wait_for("both jobs completed", lambda: {j["status"] for j in jobs_by_name(client).values()} == {"completed"},
             timeout=60)
    assert {j["host"] for j in jobs_by_name(client).values()} == {"fast"}, slow.log_text()


def test_a_slot_removed_by_a_reload_comes_back_with_the_next(serve_process, workers, tmp_path):  # noqa: F811
    host = """
        [[hosts]]
        id = "ws-s"
        slots = {slots}
    """
    jobs = ""

    def reload(slots: int, *names: str, steps: int) -> None:
        nonlocal jobs
        jobs += "".join(job(n, steps=steps) for n in names)
        path.write_text(trainer_manifest("devices.py", host.format(slots=slots) + jobs))
        assert jobs_cli(server.url, "reload").returncode == 0

    def done(*names: str) -> bool:
        return all(jobs_by_name(client)[n]["status"] == "completed" for n in names)

    server = serve_process(manifest=trainer_manifest("devices.py", host.format(slots=2)))
    path = server.data_dir.parent / "manifest.toml"
    fake_nvidia_smi(tmp_path, [])
    w = workers(server.url, "ws-s")
    client = Client(server.url)
    reload(2, "a", "b", steps=20)
    wait_for("a and b running at once", lambda: running_at_once(client, {"a", "b"}), timeout=60)
    reload(1, "c", "d", steps=5)
    wait_for("slot 1 to stop", lambda: "slot 1: no longer one of this host's slots" in w.log_text(), timeout=60)
    wait_for("a to d completed", lambda: done("a", "b", "c", "d"), timeout=60)
    reload(2, "e", "f", steps=40)
    wait_for("e and f running at once", lambda: running_at_once(client, {"e", "f"}), timeout=60)
