"""The dashboard page: served self-contained (also from the zipapp), then driven in a real headless Chromium
against a real `serve` with a real worker and trainer: live progress, failures, workers, peers, paging of
5,000 jobs, pausing in a hidden tab, and an operator cancel that stops the trainer.

Screenshots land in test-output/ at the repository root (git-ignored).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import OPERATOR_TOKEN, READ_TOKEN, clean_env, host_key_for, manifest_toml, wait_for

from cis490fleet import dashboard, errors

ROOT = Path(__file__).resolve().parent.parent
TRAINERS = Path(__file__).resolve().parent / "trainers"
SHOTS = ROOT / "test-output"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GPU_BOX = {"cores": 32, "ram_gib": 128, "cuda": True, "gpus": [{"index": 0, "name": "RTX 4090", "vram_gib": 24}],
           "vram_gib": 24, "torch": "2.13.0", "os": "Linux"}


# -- the page as served (no browser) ---------------------------------------------------------------


def _inline(body: str, tag: str) -> str:
    return re.search(rf"<{tag}>(.*?)</{tag}>", body, re.S).group(1)


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_is_self_contained_and_its_csp_allows_only_its_own_code(live_server):
    srv = live_server(manifest_toml(2))
    status, headers, body = srv.call("GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    page = body.decode()
    assert "{{" not in page
    csp = [part.strip() for part in headers["content-security-policy"].split(";")]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert f"script-src {_sha(_inline(page, 'script'))}" in csp
    assert f"style-src {_sha(_inline(page, 'style'))}" in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert "Content-Security-Policy" not in page  # one policy, in the header, where frame-ancestors counts
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page loads nothing from elsewhere"
    assert page.count("<script") == 1 and page.count("<style") == 1
    status, head_headers, head = srv.call("HEAD", "/")
    assert status == 200 and head in (b"", None)
    assert head_headers["content-security-policy"] == headers["content-security-policy"]


def test_a_damaged_package_is_named_not_a_traceback():
    with pytest.raises(errors.ConfigError, match=r"lacks its /\*{{js}}\*/ slot"):
        dashboard.build_page("<html><style>/*{{css}}*/</style><script></script>", "", "")
    with pytest.raises(errors.ConfigError, match="closing tag"):
        dashboard.build_page("/*{{css}}*//*{{js}}*/", "", "x = '</script>'")


def test_the_zipapp_carries_the_page(tmp_path):
    from cis490fleet import zipbuild

    pyz = zipbuild.build(tmp_path / "cis490fleet.pyz", git_commit="test")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from cis490fleet import dashboard; "
            "sys.stdout.buffer.write(dashboard.page())")
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(pyz)], capture_output=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == dashboard.page()


# -- in a real browser -------------------------------------------------------------------------------


def _playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install the 'chromium' package to run the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed: pip install playwright")
    return sync_playwright


@pytest.fixture
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Console:
    """Every console error and uncaught exception of a page."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


# Elements sticking out of the viewport on the right, outside of the scrollable table wrappers.
WIDER_THAN_SCREEN = """() => Array.from(document.querySelectorAll('body *'))
    .filter((e) => !e.closest('.scroll') && e.getBoundingClientRect().right > window.innerWidth + 1)
    .map((e) => e.tagName + '.' + e.className + '#' + e.id + ' ' + Math.round(e.getBoundingClientRect().right))"""




def shot(page, name: str, full_page: bool = True) -> Path:
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


def fake_nvidia_smi(tmp_path: Path) -> str:
    """A PATH whose nvidia-smi lists no GPU: capability detection is quick and the same on every machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!{sys.executable}\n")
    tool.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def fleet_manifest(steps: int, sleep: float, gpu_jobs: int) -> str:
    command = json.dumps(["{python}", str(TRAINERS / "slow.py"), "--hyper", "{hyper}", "--out", "{out}"])
    return textwrap.dedent(f"""
        [fleet]
        heartbeat_s = 0.5
        stale_after_s = 30
        max_attempts = 1
        retry_backoff_s = 0.1
        [trainer]
        command = {command}

        [[jobs]]
        name = "watched"
        model = "mlp"
        mode = "slow"
        allowed_hosts = ["ws1"]
        hyper = {{ steps = {steps}, sleep = {sleep} }}

        [[sweeps]]
        name = "gpu"
        model = "resnet"
        mode = "train"
        require_cuda = true
        seed = [{", ".join(str(i) for i in range(gpu_jobs))}]
    """)


def pid_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def worker(tmp_path):
    started = []

    def start(url: str, host: str = "ws1") -> tuple[subprocess.Popen, Path, Path]:
        work_dir, log_path = tmp_path / f"work-{host}", tmp_path / f"worker-{host}.log"
        env = clean_env()
        env.update(PATH=fake_nvidia_smi(tmp_path), PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        with open(log_path, "wb") as log:
            key_file = tmp_path / f"{host}.key"
            key_file.write_text(host_key_for(url, host).hex())
            proc = subprocess.Popen([sys.executable, "-m", "cis490fleet", "work", "--receiver", url, "--host-id", host,
                                     "--host-key-file", str(key_file), "--work-dir", str(work_dir), "--wait", "1",
                                     "--grace", "3"],
                                    cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, work_dir))
        return proc, work_dir, log_path

    yield start
    for proc, work_dir in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for pid_file in work_dir.glob("*/attempt-*/trainer.pid"):
            try:
                os.killpg(int(pid_file.read_text()), 9)
            except (OSError, ValueError):
                pass


@pytest.mark.browser
def test_live_fleet_in_the_browser_then_an_operator_cancel(browser, serve_process, worker):
    sp = serve_process(manifest=fleet_manifest(steps=150, sleep=0.2, gpu_jobs=30))
    _, _, listing = sp.call("GET", "/v1/jobs?model=mlp")
    watched = listing["jobs"][0]["id"]
    # A GPU box that fails the job it claimed: a failure with its error text, and a worker with a GPU.
    status, _, claim = sp.call("POST", "/v1/job/claim", {"capability": GPU_BOX}, {"x-lab-host": "gpu-box"})
    assert status == 200 and claim["job"]["model"] == "resnet", claim
    error = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    status, _, body = sp.call("POST", f"/v1/job/{claim['job_id']}/fail", {"error": error},
                              {"x-lab-host": "gpu-box", "x-lease": claim["lease"]})
    assert status == 200, body
    proc, work_dir, worker_log = worker(sp.url)

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    console = Console(page)
    page.goto(sp.url + "/")
    # The page asks for a token before it reads the fleet; operator actions exist only once it is entered.
    wait_for("the token prompt", lambda: "enter a read token" in page.locator("#conn").inner_text())
    assert page.locator("button[data-action]").count() == 0
    page.fill("#token", OPERATOR_TOKEN)
    page.click("#unlock button[type=submit]")
    card = page.locator(f'.run[data-key="{watched}"]')
    card.wait_for(timeout=60_000)

    def percent() -> int | None:
        value = card.locator(".bar").get_attribute("aria-valuenow")
        return int(value) if value else None

    first = wait_for("a first progress report on the page", percent)
    wait_for("the progress bar to move", lambda: (percent() or 0) > first)
    assert re.match(r"epoch \d+/150 loss \d\.\d{4} \d+% ETA \d+", card.locator(".run-text").inner_text())

    failures = page.locator("#failures")
    wait_for("the failure on the page", lambda: "CUDA out of memory" in failures.inner_text())
    failure = failures.locator(f'li[data-key="{claim["job_id"]}/1"]')
    assert "attempt 1 failed" in failure.inner_text() and failure.locator(".now").inner_text() == "failed"
    assert page.locator("#failures-count").inner_text() == "1"
    workers_text = page.locator("#workers").inner_text()
    assert "ws1" in workers_text and "gpu-box" in workers_text and "RTX 4090" in workers_text
    assert page.locator("#peers li.leader").count() == 1 and "★" in page.locator("#peers").inner_text()
    assert "1–31 of 31" in page.locator("#range").inner_text()

    cancel = card.locator("button[data-action=cancel]")
    cancel.wait_for()
    assert page.locator("#admin button[data-action=reload]").count() == 1
    assert page.evaluate("sessionStorage.length") == 1 and page.evaluate("localStorage.length") == 0

    wait_for("a loss curve", lambda: card.locator("svg polyline.curve").count() == 1)
    shot(page, "dashboard.png")
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    shot(page, "dashboard-phone.png")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, page.evaluate(WIDER_THAN_SCREEN)
    assert page.evaluate(WIDER_THAN_SCREEN) == []
    page.set_viewport_size({"width": 1360, "height": 900})

    pid = int(wait_for("the trainer's pid file", lambda: next(
        (p.read_text().strip() for p in work_dir.glob(f"{watched}/attempt-*/trainer.pid") if p.read_text().strip()),
        None)))
    assert pid_running(pid)
    cancel.click()  # arms it
    card.locator("button.armed[data-action=cancel]").click()  # confirms
    wait_for("the toast", lambda: "cancelled job" in page.locator("#toast").inner_text())
    wait_for("the job to be cancelled", lambda: sp.call("GET", f"/v1/job/{watched}")[2]["job"]["status"] == "cancelled")
    wait_for("the trainer to stop", lambda: not pid_running(pid), timeout=30)
    card.wait_for(state="detached", timeout=30_000)
    assert sp.call("GET", f"/v1/job/{watched}")[2]["job"]["progress"]["step"] < 150
    assert proc.poll() is None, worker_log.read_text()

    # The failed job's detail: its attempt with the error; then it goes back to the queue from its row.
    row = page.locator(f'#jobs tbody tr[data-key="{claim["job_id"]}"]')
    row.locator("button[data-detail]").click()
    dialog = page.locator("#detail")
    wait_for("the job detail", lambda: "Attempts" in dialog.inner_text())
    assert "CUDA out of memory" in dialog.locator("table").inner_text() and "gpu-box" in dialog.inner_text()
    shot(page, "dashboard-detail.png", full_page=False)
    page.click("#detail-close")
    assert not dialog.is_visible()
    row.locator("button[data-action=requeue]").click()
    row.locator("button.armed[data-action=requeue]").click()
    wait_for("the requeue", lambda: sp.call("GET", f"/v1/job/{claim['job_id']}")[2]["job"]["status"] == "pending")
    wait_for("the row to say so", lambda: row.locator(".badge").inner_text() == "pending")
    wait_for("the failed attempt to show its job pending again",
             lambda: failure.locator(".now").inner_text() == "pending")
    assert "CUDA out of memory" in failure.inner_text() and page.locator("#failures-count").inner_text() == ""
    page.click("#admin button[data-action=reload]")
    page.click("#admin button.armed[data-action=reload]")
    wait_for("the reload toast", lambda: "manifest reloaded: 0 added, 31 kept" in page.locator("#toast").inner_text())

    # Lock forgets the token: the actions are gone again.
    page.click("#lock")
    assert page.locator("button[data-action]").count() == 0
    assert page.evaluate("sessionStorage.length") == 0
    assert console.errors == []


@pytest.mark.browser
def test_five_thousand_jobs_page_filter_sort_and_pause(browser, live_server):
    srv = live_server(manifest_toml(5000, extra=textwrap.dedent("""
        [[sweeps]]
        name = "cnn"
        model = "cnn"
        mode = "eval"
        seed = [0, 1, 2]
    """)))
    status, _, body = srv.call("POST", "/v1/job/claim", {"capability": GPU_BOX}, {"x-lab-host": "gpu-box"})
    assert status == 200 and body["job"] is not None
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console = Console(page)
    page.goto(srv.url + "/")
    wait_for("the token prompt", lambda: "enter a read token" in page.locator("#conn").inner_text())
    page.fill("#token", READ_TOKEN)
    page.click("#unlock button[type=submit]")
    rows = page.locator("#jobs tbody tr")
    wait_for("the first page", lambda: rows.count() == 50)
    assert page.locator("button[data-action]").count() == 0  # a reader gets no operator actions
    assert page.locator("#range").inner_text() == "1–50 of 5,003"
    page.click("#next")
    wait_for("the second page", lambda: page.locator("#range").inner_text() == "51–100 of 5,003")
    page.select_option("#f-limit", "200")
    wait_for("200 a page", lambda: rows.count() == 200 and page.locator("#range").inner_text() == "1–200 of 5,003")

    page.fill("#f-model", "cnn")
    wait_for("the model filter", lambda: page.locator("#range").inner_text() == "1–3 of 3")
    page.fill("#f-model", "")
    page.click('#summary button[data-status="claimed"]')
    wait_for("the status chip filter", lambda: page.locator("#range").inner_text() == "1–1 of 1")
    assert page.locator("#f-status").input_value() == "claimed"
    page.select_option("#f-status", "")
    wait_for("all jobs again", lambda: page.locator("#range").inner_text() == "1–200 of 5,003")

    # Sorting sorts the page at hand: ids descending, then ascending.
    page.click('#jobs th[data-sort="id"] button')
    page.click('#jobs th[data-sort="id"] button')
    ids = [t for t in rows.locator("td:first-child").all_inner_texts()]
    assert ids == sorted(ids, reverse=True) and len(ids) == 200
    assert page.locator('#jobs th[data-sort="id"]').get_attribute("aria-sort") == "descending"

    # A hidden tab stops polling; showing it again resumes at once.
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.evaluate("""() => {
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    page.wait_for_timeout(500)
    assert "paused" in page.locator("#conn").inner_text()
    requests.clear()
    page.wait_for_timeout(3500)
    assert requests == []
    page.evaluate("""() => {
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    wait_for("polling to resume", lambda: any("/v1/health" in u for u in requests), timeout=10)
    shot(page, "dashboard-5000.png", full_page=False)
    assert console.errors == []

    # A wrong token is refused by the coordinator; the page says so and forgets it.
    page.click("#lock")
    page.fill("#token", "not-the-token")
    page.click("#unlock button[type=submit]")
    wait_for("the refusal", lambda: "refused the token" in page.locator("#toast").inner_text())
    assert page.locator("button[data-action]").count() == 0 and page.locator("#token").is_visible()
    assert page.evaluate("sessionStorage.length") == 0
    assert srv.call("GET", f"/v1/job/{body['job_id']}")[2]["job"]["status"] == "claimed"
    assert [e for e in console.errors if "status of 401" not in e] == []


@pytest.mark.browser
def test_another_page_cannot_frame_the_dashboard(browser, live_server):
    srv = live_server(manifest_toml(1))
    page = browser.new_page()
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "frame-ancestors" in m.text else None)
    page.set_content(f'<iframe id="f" src="{srv.url}/"></iframe>')
    frame = page.frame_locator("#f")
    wait_for("the browser to refuse the frame", lambda: refused, timeout=20)
    assert frame.locator("#jobs").count() == 0



@pytest.mark.browser
def test_the_job_detail_shows_each_attempt_s_whole_log(browser, live_server, tmp_path, monkeypatch):
    from test_worker import ONE_JOB, make_worker, trainer_manifest

    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path))
    server = live_server(trainer_manifest("crash.py", ONE_JOB))
    w = make_worker(server.url, tmp_path)
    assert w.run_once() == "failed"
    job_id = server.call("GET", "/v1/jobs")[2]["jobs"][0]["id"]

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    console = Console(page)
    page.goto(server.url + "/")
    page.fill("#token", READ_TOKEN)
    page.click("#unlock button[type=submit]")
    row = page.locator(f'#jobs tbody tr[data-key="{job_id}"]')
    row.wait_for(timeout=60_000)
    row.locator("button[data-detail]").click()
    dialog = page.locator("#detail")
    wait_for("the job detail", lambda: "Attempts" in dialog.inner_text())
    assert re.search(r"failed\s+job", dialog.locator("table").inner_text()), dialog.locator("table").inner_text()
    dialog.locator("button[data-log='1']").click()
    panel = page.locator("#attempt-log")
    wait_for("the attempt's log", lambda: "Log of attempt 1" in panel.inner_text())
    text = panel.locator("pre").inner_text()
    assert "starting, about to crash" in text and "boom: simulated trainer crash" in text, text
    assert console.errors == []


@pytest.mark.browser
def test_the_job_detail_shows_the_checkpoint_each_attempt_left(browser, live_server, tmp_path, monkeypatch):
    from test_worker import make_worker, trainer_manifest

    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path))
    job = '[[jobs]]\nname = "one"\nmodel = "mlp"\nmode = "ckpt"\nhyper = { steps = 3, sleep = 0.3 }\n'
    server = live_server(trainer_manifest("resumable.py", job))
    assert make_worker(server.url, tmp_path).run_once() == "completed"
    detail = server.call("GET", "/v1/jobs")[2]["jobs"][0]
    saved = server.call("GET", f"/v1/job/{detail['id']}")[2]["job"]["checkpoints"]
    assert len(saved) == 1 and saved[0]["epoch"] >= 1, saved

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    console = Console(page)
    page.goto(server.url + "/")
    enter_token(page)
    row = page.locator(f'#jobs tbody tr[data-key="{detail["id"]}"]')
    row.wait_for(timeout=60_000)
    row.locator("button[data-detail]").click()
    dialog = page.locator("#detail")
    wait_for("the job detail", lambda: "Attempts" in dialog.inner_text())
    table = dialog.locator("table").inner_text()
    assert "CHECKPOINT" in table.upper() and f"epoch {saved[0]['epoch']}" in table, table
    assert console.errors == []


# -- curves and results from the coordinator ----------------------------------------------------------

ANSWERS = """
    [[sweeps]]
    name = "lr"
    model = "mlp"
    mode = "sweep"
    hyper = { lr = [1e-1, 1e-3], epochs = 3, sleep = 0.7 }

    [[sweeps]]
    name = "probe"
    model = "cnn"
    mode = "asha"
    seed = [0, 1]
    allowed_hosts = ["ws9"]
    stop = { metric = "val_loss", rule = "asha", min_epochs = 1, reduction_factor = 2 }
"""
PROBE_CPU = {"cores": 4, "ram_gib": 16, "slots": 2}


def answers_fleet(live_server, tmp_path, monkeypatch):
    """A coordinator whose "lr" sweep a real worker trained (a metric point per epoch, final metrics), and
    whose "probe" sweep has one job running with four reports and one its stop rule stopped early."""
    from test_worker import make_worker, trainer_manifest

    from cis490fleet import slots

    server = live_server(trainer_manifest("metrics.py", ANSWERS, stale_after_s=600))
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path))
    w = make_worker(server.url, tmp_path)
    while w.run_once() == slots.COMPLETED:
        pass
    coord = server.coordinator
    running, stopped = (coord.claim("ws9", PROBE_CPU) for _ in range(2))
    for epoch, value in enumerate((0.5, 0.4, 0.3, 0.25), 1):
        coord.execute({"op": "heartbeat", "job_id": running["job_id"], "host": "ws9", "lease": running["lease"],
                       "progress": {"epoch": epoch, "epochs": 8, "loss": 2 * value, "metrics": {"val_loss": value}}})
    answer = coord.execute({"op": "heartbeat", "job_id": stopped["job_id"], "host": "ws9", "lease": stopped["lease"],
                            "progress": {"epoch": 1, "epochs": 8, "metrics": {"val_loss": 0.6}}})
    assert answer["cancel"] is True  # asha keeps the best 1 of 2 at rung 1
    by_name = {j["name"]: j for j in server.call("GET", "/v1/jobs")[2]["jobs"]}
    assert by_name["lr-0"]["status"] == by_name["lr-1"]["status"] == "completed"
    return server, by_name, running["job_id"], stopped["job_id"]


def enter_token(page) -> None:
    """Give the page the token it sends with every read, the CSV download's included."""
    page.fill("#token", OPERATOR_TOKEN)
    page.click("#unlock button[type=submit]")


def curve_points(chart) -> list[int]:
    """How many points each curve of an SVG chart has."""
    return [len(p.split()) for p in chart.locator("polyline.curve").evaluate_all("ls => ls.map((l) => "
                                                                                   "l.getAttribute('points'))")]


@pytest.mark.browser
def test_curves_come_from_the_coordinator_survive_a_reload_and_share_a_chart(browser, live_server, tmp_path,
                                                                              monkeypatch):
    server, by_name, running, stopped = answers_fleet(live_server, tmp_path, monkeypatch)
    history = {name: server.call("GET", f"/v1/job/{by_name[name]['id']}/metrics")[2]["attempts"]
               for name in ("lr-0", "lr-1")}
    for name, attempts in history.items():
        assert len(attempts) == 1 and len(attempts[0]["points"]) >= 2, (name, attempts)

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    console = Console(page)
    page.goto(server.url + "/")
    enter_token(page)
    card = page.locator(f'.run[data-key="{running}"]')
    # A running job's card shows every report the coordinator kept, before this page saw a single change.
    wait_for("the running job's curve", lambda: "4 reports" in card.locator(".loss-caption").inner_text(), timeout=30)
    assert curve_points(card) == [4]
    page.reload()
    wait_for("the curve again after a reload", lambda: curve_points(card) == [4], timeout=30)

    # The stop rule's job: counted, filtered and coloured as a final status of its own.
    chip = page.locator('#summary button[data-status="stopped"]')
    wait_for("the stopped chip", lambda: chip.locator("b").inner_text() == "1")
    chip.click()
    row = page.locator(f'#jobs tbody tr[data-key="{stopped}"]')
    wait_for("the stopped filter", lambda: page.locator("#range").inner_text() == "1–1 of 1" and row.count() == 1)
    assert page.locator("#f-status").input_value() == "stopped"
    colours = page.evaluate("""() => ['s-stopped', 's-failed', 's-cancelled', 's-nothing'].map((c) => {
        const b = document.createElement('span'); b.className = 'badge ' + c; document.body.append(b);
        const colour = getComputedStyle(b).color; b.remove(); return colour; })""")
    assert len(set(colours)) == 4, colours
    assert row.locator(".badge").get_attribute("class") == "badge s-stopped"
    page.click('#summary button[data-status=""]')

    # A finished job's detail draws each attempt's curve from the coordinator's history.
    lr0 = by_name["lr-0"]["id"]
    page.locator(f'#jobs tbody tr[data-key="{lr0}"] button[data-detail]').click()
    chart = page.locator("#detail .chart")
    wait_for("the finished job's curve", lambda: curve_points(chart) == [len(history["lr-0"][0]["points"])])
    assert "attempt 1" in page.locator("#detail .legend").inner_text()
    shot(page, "dashboard-detail-curves.png", full_page=False)
    page.click("#detail-close")

    # Two jobs picked in the table share one chart, one curve and legend entry each, for the metric chosen.
    for name in ("lr-0", "lr-1"):
        page.locator(f'#jobs tbody tr[data-key="{by_name[name]["id"]}"] input.pick').check()
    compare = page.locator("#compare")
    wait_for("two curves on one chart", lambda: len(curve_points(compare.locator(".chart"))) == 2)
    legend = compare.locator(".legend").inner_text()
    assert "lr-0" in legend and "lr-1" in legend
    assert compare.locator("select.metric").input_value() == "val_loss"
    compare.locator("select.metric").select_option("loss")
    wait_for("the other metric", lambda: compare.locator(".chart").get_attribute("aria-label").startswith("loss"))
    assert sorted(curve_points(compare.locator(".chart"))) == sorted(len(a[0]["points"]) for a in history.values())
    shot(page, "dashboard-compare.png")
    assert console.errors == []


@pytest.mark.browser
def test_the_results_view_ranks_completed_jobs_and_downloads_its_csv(browser, live_server, tmp_path, monkeypatch):
    server, by_name, _, _ = answers_fleet(live_server, tmp_path, monkeypatch)
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    console = Console(page)
    page.goto(server.url + "/")
    enter_token(page)
    results = page.locator("#results")
    names = lambda: results.locator("tbody td.name").all_inner_texts()  # noqa: E731

    def api_names(query: str) -> list[str]:
        status, _, body = server.call("GET", f"/v1/results?{query}")
        assert status == 200, body
        return [r["name"] for r in body["results"]]

    # Best first by the API's rule: val_loss, lower is better; lr 1e-3 has val_loss 0, 1e-1 has 2.
    wait_for("the ranked results", lambda: names() == ["lr-1", "lr-0"])
    assert names() == api_names("")
    assert results.locator("th[aria-sort]").get_attribute("data-metric") == "val_loss"
    assert "lr" in results.locator("thead").inner_text()

    results.locator('th[data-metric="val_accuracy"] button').click()
    # The order is the same as by val_loss: wait for the header too, or the next click can land on the old one.
    wait_for("ranked by accuracy, higher first", lambda: names() == api_names("sort=val_accuracy") == ["lr-1", "lr-0"]
             and results.locator('th[data-metric="val_accuracy"]').get_attribute("aria-sort") == "descending")
    results.locator('th[data-metric="val_accuracy"] button').click()
    wait_for("the other way round", lambda: names() == api_names("sort=val_accuracy&order=min") == ["lr-0", "lr-1"])
    assert results.locator('th[data-metric="val_accuracy"]').get_attribute("aria-sort") == "ascending"

    page.fill("#r-model", "cnn")
    wait_for("no completed cnn job", lambda: names() == [] and results.locator(".empty").is_visible())
    page.fill("#r-model", "")
    page.fill("#r-sweep", "lr")
    wait_for("the sweep's jobs", lambda: names() == ["lr-0", "lr-1"])

    with page.expect_download() as got:
        page.click("#r-csv")
    download = got.value
    assert download.suggested_filename == "results-lr.csv"
    text = Path(download.path()).read_text()
    status, _, want = server.call("GET", "/v1/results?sweep=lr&sort=val_accuracy&order=min&format=csv")
    assert status == 200 and text == (want if isinstance(want, str) else want.decode())
    rows = text.splitlines()
    assert rows[0] == "name,id,model,mode,seed,epochs,lr,sleep,train_loss,val_accuracy,val_loss" and [r.split(",")[0] for r in rows[1:]] == ["lr-0", "lr-1"]

    # The sweep's curves on one chart, from the results.
    page.click("#r-chart")
    wait_for("the sweep on one chart", lambda: len(curve_points(page.locator("#compare .chart"))) == 2)
    shot(page, "dashboard-results.png")
    assert console.errors == []
