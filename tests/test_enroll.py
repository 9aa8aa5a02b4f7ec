"""`enroll`: every file it writes under a staging root, idempotent re-runs, uninstall, dry runs,
the units through systemd-analyze, the Windows task XML, the coordinator check's failing step,
and a loopback round trip (fetched pyz -> enroll -> installed worker completes a job)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import threading
import tomllib
import xml.etree.ElementTree as ET
import zipapp
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from cis490fleet import enroll, errors, worker_config
from conftest import clean_env

ROOT = Path(__file__).resolve().parent.parent
TRAINERS = ROOT / "tests" / "trainers"
TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


@pytest.fixture(scope="module")
def detected() -> dict:
    from cis490fleet import capability

    return capability.detect()


@pytest.fixture(autouse=True)
def detect_once(detected, monkeypatch):
    """In-process runs reuse one real detection (its torch probe takes seconds); subprocess runs probe afresh."""
    from cis490fleet import capability
    from cis490fleet.model import normalize_capability

    monkeypatch.setattr(capability, "detect", lambda overrides=None, **kw: normalize_capability(
        {**detected, **(overrides or {})}))


@pytest.fixture
def pyz(tmp_path) -> Path:
    """A tiny real zipapp standing in for cis490fleet.pyz (enroll only copies it)."""
    src = tmp_path / "pyz-src"
    src.mkdir()
    (src / "__main__.py").write_text("print('stand-in')\n")
    target = tmp_path / "stand-in.pyz"
    zipapp.create_archive(src, target)
    return target


@pytest.fixture
def pem_files(tmp_path) -> dict[str, Path]:
    files = {}
    for name in ("ca", "cert", "key"):
        files[name] = tmp_path / f"given-{name}.pem"
        files[name].write_text(f"-----BEGIN {name.upper()}-----\n{name}\n-----END {name.upper()}-----\n")
    return files


def enroll_main(capsys, *argv) -> tuple[int, str]:
    rc = enroll.main([str(a) for a in argv])
    return rc, capsys.readouterr().out


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: (kind, mode, content)."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = "/" + path.relative_to(root).as_posix()
        content = path.read_bytes() if path.is_file() else None
        found[rel] = ("dir" if path.is_dir() else "file", stat.S_IMODE(st.st_mode), content)
    return found


def worker_args(root: Path, pyz: Path, *extra) -> list:
    return ["worker", "--root", root, "--pyz", pyz, "--receiver", "https://coord.lab:8445", "--host-id", "ws1",
            "--skip-coordinator-check", *extra]


def error_lines(stderr: str) -> list[str]:
    """stderr without log records (capability probes may warn on a busy host)."""
    return [line for line in stderr.strip().splitlines() if not re.match(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ ", line)]


def run_cli(*argv, cwd=ROOT, timeout=120) -> subprocess.CompletedProcess:
    env = clean_env()
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "cis490fleet", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


# -- the repository's unit files ----------------------------------------------------------------


def test_repository_units_are_the_rendered_defaults():
    assert (ROOT / "systemd" / "cis490fleet-worker.service").read_text() == enroll.render_worker_unit()
    assert (ROOT / "systemd" / "cis490fleet-coordinator.service").read_text() == enroll.render_coordinator_unit()


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_worker_unit_hardening_and_stop_timeout_follow_the_grace_period():
    unit = unit_settings(enroll.render_worker_unit(grace_s=50))
    assert unit["User"] == ["cis490fleet"]
    assert unit["ExecStart"] == ["/usr/bin/python3 /opt/cis490fleet/cis490fleet.pyz work --config "
                                 "/etc/cis490fleet/worker.toml"]
    assert unit["TimeoutStopSec"] == [str(50 + enroll.STOP_MARGIN_S)]
    for key, value in {"Restart": "on-failure", "KillMode": "mixed", "NoNewPrivileges": "yes",
                       "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes"}.items():
        assert unit[key] == [value], key
    # GPUs stay reachable, and no other device: CUDA's and ROCm's character devices only.
    assert "PrivateDevices" not in unit and unit["DevicePolicy"] == ["closed"]
    assert {"char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-drm rw", "char-kfd rw"} <= set(unit["DeviceAllow"])
    assert unit["ReadWritePaths"] == ["/var/lib/cis490fleet"]
    outside = unit_settings(enroll.render_worker_unit(work_dir=PurePosixPath("/srv/train")))
    assert outside["ReadWritePaths"] == ["/var/lib/cis490fleet /srv/train"]


def test_coordinator_unit_is_notify_with_a_watchdog():
    unit = unit_settings(enroll.render_coordinator_unit())
    assert unit["Type"] == ["notify"] and unit["WatchdogSec"] == [str(enroll.WATCHDOG_S)]
    assert unit["EnvironmentFile"] == ["/etc/cis490fleet/coordinator.env"]
    assert unit["ExecStart"][0].endswith("serve --data /var/lib/cis490fleet/data $CIS490FLEET_SERVE_ARGS")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed on this host")
@pytest.mark.parametrize("unit", ["cis490fleet-worker.service", "cis490fleet-coordinator.service"])
def test_units_score_at_most_4_in_systemd_analyze_security(unit):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(ROOT / "systemd" / unit)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    if found is None and "--offline" in proc.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {proc.stderr.strip()[:200]}")
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert float(found.group(1)) <= 4.0, proc.stdout


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed on this host")
def test_units_pass_systemd_analyze_verify(tmp_path, pyz):
    # ExecStart must name files that exist here, or verify fails on that alone.
    env_file = tmp_path / "coordinator.env"
    env_file.write_text(enroll.render_coordinator_env(["--bind", "127.0.0.1:8445"]))
    units = {
        "cis490fleet-worker.service": enroll.render_worker_unit(python=sys.executable, pyz=PurePosixPath(pyz)),
        "cis490fleet-coordinator.service": enroll.render_coordinator_unit(
            python=sys.executable, pyz=PurePosixPath(pyz), env_file=PurePosixPath(env_file)),
    }
    paths = []
    for name, text in units.items():
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    proc = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stderr + proc.stdout).splitlines()
                  if any(name in line for name in units)]
    assert proc.returncode == 0, proc.stderr
    assert not complaints, complaints  # unknown keys and bad values are only warnings: none allowed


# -- enroll worker under a staging root ---------------------------------------------------------


def test_worker_install_writes_exactly_these_files(tmp_path, pyz, pem_files, capsys):
    root = tmp_path / "root"
    rc, out = enroll_main(capsys, *worker_args(root, pyz, "--slots", "2", "--grace-s", "20",
                                                 "--ca", pem_files["ca"], "--cert", pem_files["cert"],
                                                 "--key", pem_files["key"]))
    assert rc == 0, out
    files = snapshot(root)
    written = {p: (mode, content) for p, (kind, mode, content) in files.items() if kind == "file"}
    assert set(written) == {
        "/opt/cis490fleet/cis490fleet.pyz", "/opt/cis490fleet/enrolled-worker.json",
        "/etc/cis490fleet/worker.toml", "/etc/cis490fleet/ca.pem", "/etc/cis490fleet/host.pem",
        "/etc/cis490fleet/host.key", "/etc/systemd/system/cis490fleet-worker.service",
    }
    assert written["/opt/cis490fleet/cis490fleet.pyz"] == (0o644, pyz.read_bytes())
    assert written["/etc/cis490fleet/host.key"] == (0o640, pem_files["key"].read_bytes())
    assert written["/etc/cis490fleet/ca.pem"] == (0o644, pem_files["ca"].read_bytes())
    assert files["/var/lib/cis490fleet/work"][:2] == ("dir", 0o750)

    config_text = written["/etc/cis490fleet/worker.toml"][1].decode()
    assert tomllib.loads(config_text) == {
        "receiver": ["https://coord.lab:8445"], "host_id": "ws1", "work_dir": "/var/lib/cis490fleet/work",
        "grace_s": 20, "slots": 2, "ca": "/etc/cis490fleet/ca.pem", "cert": "/etc/cis490fleet/host.pem",
        "key": "/etc/cis490fleet/host.key",
    }
    config_path = root / "etc/cis490fleet/worker.toml"
    assert worker_config.read_config_file(config_path)  # the worker's own reader accepts every key

    unit = written["/etc/systemd/system/cis490fleet-worker.service"][1].decode()
    assert unit == enroll.render_worker_unit(grace_s=20)
    record = json.loads(written["/opt/cis490fleet/enrolled-worker.json"][1])
    assert record["user"] == "cis490fleet" and record["data_dirs"] == ["/var/lib/cis490fleet/work"]

    # Under --root nothing touches the live system: every command is printed, none run.
    assert "not run (staging root; run it on the target host): systemctl daemon-reload" in out
    assert "not run (staging root; run it on the target host): systemctl enable --now cis490fleet-worker.service" in out
    assert "useradd --system" in out
    assert "capability: {" in out and "coordinator check skipped" in out


def test_from_a_source_tree_it_installs_a_freshly_built_zipapp(tmp_path, capsys):
    import io
    import zipfile

    root = tmp_path / "root"
    rc, out = enroll_main(capsys, "worker", "--root", root, "--receiver", "http://x:1", "--skip-coordinator-check")
    assert rc == 0 and "pyz: built from this source tree" in out
    with zipfile.ZipFile(io.BytesIO((root / "opt/cis490fleet/cis490fleet.pyz").read_bytes())) as z:
        assert {"__main__.py", "cis490fleet/enroll.py", "cis490fleet/worker.py"} <= set(z.namelist())


def test_no_start_enables_without_starting(tmp_path, pyz, capsys):
    rc, out = enroll_main(capsys, *worker_args(tmp_path / "root", pyz, "--no-start"))
    assert rc == 0
    assert "systemctl enable cis490fleet-worker.service" in out and "--now" not in out
    assert "(not started: --no-start)" in out


def test_second_run_changes_nothing_but_the_pyz(tmp_path, pyz, capsys):
    root = tmp_path / "root"
    assert enroll_main(capsys, *worker_args(root, pyz, "--grace-s", "20"))[0] == 0
    before = snapshot(root)

    rc, out = enroll_main(capsys, *worker_args(root, pyz, "--grace-s", "20"))
    assert rc == 0
    assert snapshot(root) == before
    assert "kept /etc/cis490fleet/worker.toml" in out
    assert "unchanged /etc/systemd/system/cis490fleet-worker.service" in out
    assert "daemon-reload" not in out and "try-restart" not in out

    newer = tmp_path / "newer.pyz"
    newer.write_bytes(pyz.read_bytes() + b"\n# a newer build\n")
    # Different flags too: an existing config is kept as it is.
    rc, out = enroll_main(capsys, "worker", "--root", root, "--pyz", newer, "--receiver", "http://other:1",
                          "--host-id", "other", "--slots", "7", "--skip-coordinator-check")
    assert rc == 0
    after = snapshot(root)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed == {"/opt/cis490fleet/cis490fleet.pyz"}
    assert after["/opt/cis490fleet/cis490fleet.pyz"][2] == newer.read_bytes()
    assert "updated /opt/cis490fleet/cis490fleet.pyz" in out
    assert "enrolling as ws1 with https://coord.lab:8445, as it says" in out
    assert "systemctl try-restart cis490fleet-worker.service" in out  # the running worker picks up the upgrade


def test_an_existing_config_decides_the_unit(tmp_path, pyz, capsys):
    root = tmp_path / "root"
    config = root / "etc/cis490fleet/worker.toml"
    config.parent.mkdir(parents=True)
    config.write_text('receiver = ["http://c:1"]\nhost_id = "mine"\nwork_dir = "/srv/train"\ngrace_s = 100\n')
    rc, out = enroll_main(capsys, *worker_args(root, pyz))
    assert rc == 0
    assert config.read_text().startswith('receiver = ["http://c:1"]')
    unit = unit_settings((root / "etc/systemd/system/cis490fleet-worker.service").read_text())
    assert unit["TimeoutStopSec"] == ["115"]
    assert unit["ReadWritePaths"] == ["/var/lib/cis490fleet /srv/train"]
    # enroll did not write the config, so uninstall leaves it.
    assert enroll_main(capsys, "uninstall", "--root", root, "--purge")[0] == 0
    assert config.read_text().endswith("grace_s = 100\n")


def test_uninstall_reverses_everything(tmp_path, pyz, pem_files, capsys):
    root = tmp_path / "root"
    assert enroll_main(capsys, *worker_args(root, pyz, "--ca", pem_files["ca"]))[0] == 0
    (root / "var/lib/cis490fleet/work/job-output").write_text("results\n")

    rc, out = enroll_main(capsys, "uninstall", "--root", root)
    assert rc == 0
    assert "systemctl disable --now cis490fleet-worker.service" in out
    assert set(snapshot(root)) == {"/var", "/var/lib", "/var/lib/cis490fleet", "/var/lib/cis490fleet/work",
                                   "/var/lib/cis490fleet/work/job-output"}  # data is kept without --purge
    assert "data folders kept" in out

    rc, out = enroll_main(capsys, "uninstall", "--root", root, "--purge")
    assert rc == 0
    assert snapshot(root) == {}


def test_uninstall_of_one_service_keeps_the_shared_pyz(tmp_path, pyz, capsys):
    root = tmp_path / "root"
    assert enroll_main(capsys, *worker_args(root, pyz))[0] == 0
    assert enroll_main(capsys, "coordinator", "--root", root, "--pyz", pyz)[0] == 0
    assert enroll_main(capsys, "uninstall", "worker", "--root", root)[0] == 0
    assert (root / "opt/cis490fleet/cis490fleet.pyz").is_file()
    assert (root / "etc/systemd/system/cis490fleet-coordinator.service").is_file()
    assert not (root / "etc/systemd/system/cis490fleet-worker.service").exists()
    assert enroll_main(capsys, "uninstall", "--root", root, "--purge")[0] == 0
    assert snapshot(root) == {}


def test_dry_run_writes_nothing_and_lists_every_file_and_command(tmp_path, pyz, capsys):
    root = tmp_path / "root"
    rc, out = enroll_main(capsys, *worker_args(root, pyz, "--dry-run"))
    assert rc == 0
    assert not root.exists()
    for target in ("/opt/cis490fleet/cis490fleet.pyz", "/etc/cis490fleet/worker.toml",
                   "/opt/cis490fleet/enrolled-worker.json",
                   "/etc/systemd/system/cis490fleet-worker.service"):
        assert f"would write {target} (" in out
    assert "would create folder /var/lib/cis490fleet/work" in out
    for command in ("useradd --system", "systemctl daemon-reload",
                    "systemctl enable --now cis490fleet-worker.service"):
        assert f"would run: {command}" in out
    assert "not run" not in out

    # After a real staged install, a dry uninstall lists the removals and removes nothing.
    assert enroll_main(capsys, *worker_args(root, pyz))[0] == 0
    before = snapshot(root)
    rc, out = enroll_main(capsys, "uninstall", "--root", root, "--dry-run", "--purge")
    assert rc == 0 and snapshot(root) == before
    assert "would remove /etc/cis490fleet/worker.toml" in out
    assert "would remove folder /var/lib/cis490fleet/work" in out
    assert "would run: systemctl disable --now cis490fleet-worker.service" in out


def test_dry_run_without_root_touches_no_system_path(pyz, capsys):
    if Path("/opt/cis490fleet").exists() or Path("/etc/cis490fleet").exists():
        pytest.skip("cis490fleet is installed on this host; the check needs a clean one")
    rc, out = enroll_main(capsys, "worker", "--dry-run", "--pyz", pyz, "--receiver", "http://127.0.0.1:9",
                          "--host-id", "ws1", "--skip-coordinator-check")
    assert rc == 0
    assert "would write /opt/cis490fleet/cis490fleet.pyz" in out
    assert not Path("/opt/cis490fleet").exists() and not Path("/etc/cis490fleet").exists()
    assert not Path("/etc/systemd/system/cis490fleet-worker.service").exists()


# -- enroll coordinator -------------------------------------------------------------------------


def test_coordinator_install_writes_env_token_manifest_and_unit(tmp_path, pyz, capsys):
    root = tmp_path / "root"
    manifest = tmp_path / "m.toml"
    manifest.write_text('[[jobs]]\nmodel = "mlp"\nmode = "train"\n')
    rc, out = enroll_main(capsys, "coordinator", "--root", root, "--pyz", pyz, "--manifest", manifest,
                          "--bind", "0.0.0.0:8445", "--insecure")
    assert rc == 0, out
    files = snapshot(root)
    env = files["/etc/cis490fleet/coordinator.env"][2].decode()
    args_line = [line for line in env.splitlines() if line.startswith("CIS490FLEET_SERVE_ARGS=")]
    assert args_line == ["CIS490FLEET_SERVE_ARGS=--bind 0.0.0.0:8445 --operator-token-file "
                         "/etc/cis490fleet/operator.token --manifest /etc/cis490fleet/training_manifest.toml "
                         "--insecure"]
    token_mode, token = files["/etc/cis490fleet/operator.token"][1:]
    assert token_mode == 0o640 and len(token.strip()) >= 32
    assert files["/etc/cis490fleet/training_manifest.toml"][2] == manifest.read_bytes()
    assert files["/etc/systemd/system/cis490fleet-coordinator.service"][2].decode() == \
        enroll.render_coordinator_unit()
    assert files["/var/lib/cis490fleet/data"][:2] == ("dir", 0o750)

    before = snapshot(root)
    assert enroll_main(capsys, "coordinator", "--root", root, "--pyz", pyz)[0] == 0
    assert snapshot(root) == before  # the token is not regenerated, the env file is kept


def test_coordinator_refuses_an_open_bind_without_tls(tmp_path, pyz):
    with pytest.raises(errors.ConfigError, match="--cert/--key"):
        enroll.main(["coordinator", "--root", str(tmp_path / "root"), "--pyz", str(pyz), "--bind", "0.0.0.0:8445"])
    assert not (tmp_path / "root").exists()


# -- Windows ------------------------------------------------------------------------------------


def task_xml(**kw) -> ET.Element:
    xml = enroll.render_task_xml(python=r"C:\Python311\python.exe",
                                 pyz=PureWindowsPath(r"C:\ProgramData\cis490fleet\cis490fleet.pyz"),
                                 config=PureWindowsPath(r"C:\ProgramData\cis490fleet\worker.toml"),
                                 working_dir=PureWindowsPath(r"C:\ProgramData\cis490fleet"), **kw)
    return ET.fromstring(xml.encode("utf-16"))


def test_task_xml_boots_restarts_and_runs_the_worker():
    task = task_xml()
    assert task.get("version") == "1.2"
    assert task.find("t:Triggers/t:BootTrigger/t:Enabled", TASK_NS).text == "true"
    assert task.find("t:Settings/t:RestartOnFailure/t:Interval", TASK_NS).text == "PT1M"
    assert int(task.find("t:Settings/t:RestartOnFailure/t:Count", TASK_NS).text) >= 3
    assert task.find("t:Settings/t:ExecutionTimeLimit", TASK_NS).text == "PT0S"
    assert task.find("t:Settings/t:MultipleInstancesPolicy", TASK_NS).text == "IgnoreNew"
    assert task.find("t:Principals/t:Principal/t:UserId", TASK_NS).text == "S-1-5-20"
    assert task.find("t:Principals/t:Principal/t:LogonType", TASK_NS).text == "ServiceAccount"
    exec_ = task.find("t:Actions/t:Exec", TASK_NS)
    assert exec_.find("t:Command", TASK_NS).text == r"C:\Python311\python.exe"
    assert exec_.find("t:Arguments", TASK_NS).text == (
        r"C:\ProgramData\cis490fleet\cis490fleet.pyz work --config C:\ProgramData\cis490fleet\worker.toml")


def test_task_xml_for_a_named_account_uses_s4u_and_escapes():
    task = task_xml(account=r"LAB\trainer&co")
    assert task.find("t:Principals/t:Principal/t:UserId", TASK_NS).text == r"LAB\trainer&co"
    assert task.find("t:Principals/t:Principal/t:LogonType", TASK_NS).text == "S4U"


def test_windows_layout_staged_from_linux(tmp_path, pyz, capsys):
    root = tmp_path / "root"
    rc, out = enroll_main(capsys, "worker", "--os", "windows", "--root", root, "--pyz", pyz,
                          "--receiver", "http://coord.lab:8445", "--host-id", "win1", "--skip-coordinator-check",
                          "--python", r"C:\Python311\python.exe", "--program-data", r"C:\ProgramData")
    assert rc == 0, out
    base = root / "ProgramData" / "cis490fleet"
    assert sorted(p.name for p in base.iterdir()) == [
        "cis490fleet-worker.xml", "cis490fleet.pyz", "enrolled-worker.json", "work", "worker.toml"]
    raw = (base / "cis490fleet-worker.xml").read_bytes()
    assert raw.startswith(b"\xff\xfe")  # UTF-16 with a BOM, as schtasks /XML wants
    task = ET.fromstring(raw)
    assert task.find("t:Actions/t:Exec/t:WorkingDirectory", TASK_NS).text == r"C:\ProgramData\cis490fleet"
    config = tomllib.loads((base / "worker.toml").read_text())
    assert config["work_dir"] == r"C:\ProgramData\cis490fleet\work"
    assert ("not run (staging root; run it on the target host): schtasks /Create /TN cis490fleet-worker "
            r"/XML C:\ProgramData\cis490fleet\cis490fleet-worker.xml /F") in out
    assert enroll_main(capsys, "uninstall", "--os", "windows", "--root", root, "--purge",
                       "--program-data", r"C:\ProgramData")[0] == 0
    assert snapshot(root) == {}


def test_install_script_has_the_documented_parameters():
    text = (ROOT / "cis490fleet" / "windows" / "install-worker.ps1").read_text()
    for needle in ("[string[]]$Receiver", "[string]$HostId", "[string]$Account", "[switch]$Uninstall",
                   "-RestartCount", "-RestartInterval", "-AtStartup", "Register-ScheduledTask",
                   "Unregister-ScheduledTask", "'cis490fleet-worker'", "work --config"):
        assert needle in text, needle


@pytest.mark.skipif(not shutil.which("pwsh"), reason="PowerShell (pwsh) is not installed on this host")
def test_install_script_parses_in_powershell():
    script = ROOT / "cis490fleet" / "windows" / "install-worker.ps1"
    command = ("$errs = $null; [System.Management.Automation.Language.Parser]::ParseFile("
               f"'{script}', [ref]$null, [ref]$errs) | Out-Null; "
               "if ($errs) { $errs | ForEach-Object { $_.ToString() }; exit 1 }")
    proc = subprocess.run(["pwsh", "-NoProfile", "-NonInteractive", "-Command", command],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- bad input: one clear line ------------------------------------------------------------------


@pytest.mark.parametrize("argv, says", [
    (["worker", "--receiver", "ftp://x"], "not an http:// or https:// URL"),
    (["worker", "--receiver", "http://x:1", "--host-id", "bad host"], "host id 'bad host' is not valid"),
    (["worker", "--receiver", "https://x:1", "--cert", "{pyz}"], "needs both --cert and --key"),
    (["worker", "--receiver", "https://x:1", "--ca", "/no/such/ca.pem"], "--ca '/no/such/ca.pem' does not exist"),
    (["worker", "--receiver", "http://x:1", "--slots", "0"], "--slots must be an integer >= 1"),
    (["worker", "--receiver", "http://x:1", "--work-dir", "relative/dir"], "must be an absolute path"),
    (["worker", "--receiver", "http://x:1", "--user", "Bad User"], "not a valid Linux user name"),
    (["coordinator", "--bind", "nowhere"], "is not HOST:PORT"),
    (["coordinator", "--bind", "0.0.0.0:0"], "a service needs a fixed port"),
    (["coordinator", "--bind", "10.1.2.3:8445"], "reachable from other hosts"),
    (["coordinator", "--client-ca", "{pyz}"], "needs --cert and --key"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, pyz, argv, says):
    argv = [a.replace("{pyz}", str(pyz)) for a in argv]
    proc = run_cli("enroll", *argv, "--root", tmp_path / "root", "--pyz", pyz, "--skip-coordinator-check"
                   if argv[0] == "worker" else "--no-start")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert not (tmp_path / "root").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run a child as nobody")
def test_a_live_install_needs_root():
    env = clean_env()
    env["PYTHONPATH"] = str(ROOT)
    python = "/usr/bin/python3"  # the test's own interpreter may sit in a folder only root can enter
    try:
        proc = subprocess.run([python, "-m", "cis490fleet", "enroll", "worker", "--receiver", "http://x:1",
                               "--skip-coordinator-check"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60, user="nobody", stdin=subprocess.DEVNULL)
    except (PermissionError, FileNotFoundError) as err:
        pytest.skip(f"cannot run {python} as nobody: {err}")
    if proc.returncode != 2 and ("Permission denied" in proc.stderr or "No module named" in proc.stderr
                                 or "needs Python" in proc.stderr):
        pytest.skip(f"nobody cannot run this checkout with {python}: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["cis490fleet enroll: enroll installs a system service: run it as root (sudo), "
                                        "or preview with --dry-run, or stage with --root DIR"]


def test_bad_manifest_is_refused_before_anything_is_written(tmp_path, pyz):
    manifest = tmp_path / "m.toml"
    manifest.write_text("[[jobs]]\nmodel = 3\n")
    proc = run_cli("enroll", "coordinator", "--root", tmp_path / "root", "--pyz", pyz, "--manifest", manifest)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "m.toml" in proc.stderr
    assert not (tmp_path / "root").exists()


def test_toml_writer_round_trips_awkward_strings():
    doc = {"a": 'quote " back\\slash \x7f tab\t nl\n é', "list": ["x", "y"], "n": 3, "f": 0.5, "b": False,
           "capability": {"cuda": False, "odd key": 1}}
    assert tomllib.loads(enroll.toml_dumps(doc, header="one\ntwo")) == doc


def test_python_version_check():
    enroll.check_python((3, 11, 0))
    with pytest.raises(errors.ConfigError, match=r"needs Python >= 3.11; this Python is 3.9.7"):
        enroll.check_python((3, 9, 7))


def test_an_old_service_python_is_refused(tmp_path, pyz):
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\necho 3.9.1\n")
    old.chmod(0o755)
    with pytest.raises(errors.ConfigError, match=rf"needs Python >= 3.11; the service python {old} .* is 3.9.1"):
        enroll.main(["worker", "--dry-run", "--pyz", str(pyz), "--python", str(old), "--receiver", "http://x:1",
                     "--skip-coordinator-check"])


# -- the coordinator check names the step that fails --------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        if self.path == "/v1/zipapp":
            body = self.server.zipapp
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        body = json.dumps({"ok": True, "role": "leader"}).encode()
        self.send_response(self.server.answer_status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    """Factory: a /v1/health answering ``status`` on 127.0.0.1, plain or with ``context``."""
    servers = []

    def start(status: int = 200, context: ssl.SSLContext | None = None, zipapp: bytes = b"") -> str:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
        srv.answer_status = status
        srv.zipapp = zipapp
        if context is not None:
            srv.socket = context.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"{'https' if context else 'http'}://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture
def tls_server_context(ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


def test_diagnose_names_each_failing_step(health_server, tls_server_context, ca, tmp_path):
    assert enroll.diagnose("http://no-such-host.invalid:8445", None, None, None).startswith("DNS:")
    assert enroll.diagnose(f"http://127.0.0.1:{_free_port()}", None, None, None).startswith("connect:")
    plain = health_server()
    assert enroll.diagnose(plain.replace("http:", "https:"), None, None, None).startswith("TLS handshake:")
    tls_url = health_server(context=tls_server_context)
    assert enroll.diagnose(tls_url, None, None, None).startswith("certificate verify:")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    assert enroll.diagnose(tls_url, str(ca_file), None, None) is None
    assert enroll.diagnose(health_server(status=404), None, None, None).startswith("HTTP status: GET /v1/health "
                                                                                   "answered 404")
    assert enroll.diagnose(plain, None, None, None) is None


def test_diagnose_reports_a_refused_client_certificate(health_server, ca, tmp_path):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    url = health_server(context=ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    assert enroll.diagnose(url, str(ca_file), None, None).startswith("TLS handshake:")
    client = ca.issue_cert("ws1")
    cert, key = tmp_path / "ws1.pem", tmp_path / "ws1.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    assert enroll.diagnose(url, str(ca_file), str(cert), str(key)) is None


def test_unreachable_coordinator_stops_enroll_with_the_url_and_step(tmp_path, pyz):
    url = f"http://127.0.0.1:{_free_port()}"
    proc = run_cli("enroll", "worker", "--root", tmp_path / "root", "--pyz", pyz, "--receiver", url,
                   "--host-id", "ws1")
    assert proc.returncode == 5, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and f"{url}: connect:" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "root").exists()


def test_untrusted_certificate_is_reported_as_such(tmp_path, pyz, health_server, tls_server_context, capsys):
    url = health_server(context=tls_server_context)
    with pytest.raises(errors.Unavailable, match=r"certificate verify: .*--ca"):
        enroll.main(["worker", "--root", str(tmp_path / "root"), "--pyz", str(pyz), "--receiver", url,
                     "--host-id", "ws1"])


# -- the round trip on loopback -----------------------------------------------------------------


def test_round_trip_fetched_pyz_enrolls_and_the_installed_worker_completes_a_job(tmp_path, serve_process):
    from cis490fleet.client import Client
    from tests.conftest import manifest_toml

    trainer = {"command": ["{python}", str(TRAINERS / "ok.py"), "--model", "{model}", "--seed", "{seed}",
                           "--out", "{out}"]}
    manifest = manifest_toml(1) + "\n[trainer]\ncommand = " + json.dumps(trainer["command"]) + "\n"
    sp = serve_process(manifest=manifest)
    fetched = tmp_path / "fetched.pyz"
    with Client(sp.url) as client:
        try:
            client.download_zipapp(fetched)
        except errors.FleetError as err:
            pytest.skip(f"serve cannot hand out its zipapp yet: {err}")

    root = tmp_path / "root"
    work = root / "var/lib/cis490fleet/work"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIS490_", "PYTHONPATH"))}
    key_file = tmp_path / "rt1.key"  # what `jobs hosts add rt1` printed
    key_file.write_text(sp.host_key("rt1").hex() + "\n")
    enrolled = subprocess.run([sys.executable, str(fetched), "enroll", "worker", "--root", str(root), "--no-start",
                               "--receiver", sp.url, "--host-id", "rt1", "--work-dir", str(work),
                               "--host-key-file", str(key_file)],
                              capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    assert f"coordinator {sp.url}: ok" in enrolled.stdout
    assert "registered rt1" in enrolled.stdout
    installed = root / "opt/cis490fleet/cis490fleet.pyz"
    assert installed.read_bytes() == fetched.read_bytes()

    worked = subprocess.run([sys.executable, str(installed), "work", "--config",
                             str(root / "etc/cis490fleet/worker.toml"), "--host-key-file",
                             str(root / "etc/cis490fleet/host-signing.key"), "--once", "--wait", "0"],
                            capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert worked.returncode == 0, worked.stderr[-3000:]
    status, _, body = sp.call("GET", "/v1/jobs")
    assert status == 200
    assert [(j["status"], j.get("host") or j.get("holder")) for j in body["jobs"]] == [("completed", "rt1")]


# -- trust: a pinned zipapp, the host key on standard input, secrets never readable by others ----

KEY = "fedcba9876543210" * 4


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["worker", "coordinator"])
def test_a_zipapp_that_differs_from_the_pin_is_refused_before_anything_is_written(tmp_path, pyz, kind, capsys):
    root = tmp_path / "root"
    argv = (worker_args(root, pyz) if kind == "worker" else ["coordinator", "--root", root, "--pyz", pyz])
    with pytest.raises(errors.ConfigError, match=f"has sha256 {sha(pyz)}, not the pinned {'0' * 64}"):
        enroll.main([str(a) for a in argv] + ["--zipapp-sha256", "0" * 64])
    assert not root.exists() or snapshot(root) == {}
    rc, out = enroll_main(capsys, *argv, "--zipapp-sha256", sha(pyz).upper())
    assert rc == 0, out
    assert (root / "opt/cis490fleet/cis490fleet.pyz").read_bytes() == pyz.read_bytes()


def test_a_downloaded_zipapp_needs_https_or_insecure_and_the_pin(tmp_path, pyz, health_server, capsys):
    url = health_server(zipapp=pyz.read_bytes()) + "/v1/zipapp"
    root = tmp_path / "root"
    base = ["worker", "--root", str(root), "--receiver", "https://coord.lab:8445", "--host-id", "ws1",
            "--skip-coordinator-check", "--pyz", url]
    with pytest.raises(errors.ConfigError, match="needs --zipapp-sha256"):
        enroll.main(base)
    with pytest.raises(errors.ConfigError, match="refusing a plain http:// download"):
        enroll.main(base + ["--zipapp-sha256", sha(pyz)])
    with pytest.raises(errors.ConfigError, match="not the pinned"):
        enroll.main(base + ["--zipapp-sha256", "1" * 64, "--insecure"])
    assert not root.exists() or snapshot(root) == {}
    rc, out = enroll_main(capsys, *base, "--zipapp-sha256", sha(pyz), "--insecure")
    assert rc == 0, out
    assert (root / "opt/cis490fleet/cis490fleet.pyz").read_bytes() == pyz.read_bytes()


def test_the_host_key_comes_on_stdin_and_only_the_service_can_read_it(tmp_path, pyz):
    root = tmp_path / "root"
    env = clean_env()
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "cis490fleet", "enroll", *map(str, worker_args(root, pyz)),
                           "--host", "ws9", "--host-key-file", "-", "--zipapp-sha256", sha(pyz)],
                          input=KEY + "\n", env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert KEY not in proc.stdout + proc.stderr
    files = snapshot(root)
    assert files["/etc/cis490fleet/host-signing.key"][1:] == (0o640, (KEY + "\n").encode())
    unit = unit_settings(files["/etc/systemd/system/cis490fleet-worker.service"][2].decode())
    assert unit["ExecStart"] == ["/usr/bin/python3 /opt/cis490fleet/cis490fleet.pyz work --config "
                                 "/etc/cis490fleet/worker.toml --host-key-file /etc/cis490fleet/host-signing.key"]
    assert tomllib.loads(files["/etc/cis490fleet/worker.toml"][2].decode())["host_id"] == "ws9"
    # A later run without the flag keeps the installed key in the unit.
    proc = subprocess.run([sys.executable, "-m", "cis490fleet", "enroll", *map(str, worker_args(root, pyz))],
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(root)["/etc/systemd/system/cis490fleet-worker.service"] == \
        files["/etc/systemd/system/cis490fleet-worker.service"]


@pytest.mark.parametrize("given", ["", "short", "two words here and there", "g" * 64])
def test_a_missing_or_malformed_host_key_is_refused(tmp_path, pyz, given):
    key_file = tmp_path / "key"
    key_file.write_text(given)
    with pytest.raises(errors.ConfigError, match="does not hold a key: expected 64 hex digits"):
        enroll.main([str(a) for a in worker_args(tmp_path / "root", pyz)] + ["--host-key-file", str(key_file)])
    assert not (tmp_path / "root").exists()


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is not installed on this host")
def test_secret_files_are_created_with_their_final_mode(tmp_path, pyz, pem_files):
    """strace records the mode each file is created with: a secret must never exist readable by others."""
    root = tmp_path / "root"
    key_file = tmp_path / "given.key"
    key_file.write_text(KEY)
    trace = tmp_path / "trace"
    env = clean_env()
    env["PYTHONPATH"] = str(ROOT)
    for argv in (worker_args(root, pyz, "--host-key-file", key_file, "--ca", pem_files["ca"],
                             "--cert", pem_files["cert"], "--key", pem_files["key"]),
                 ["coordinator", "--root", root, "--pyz", pyz, "--cluster-key-file", key_file]):
        proc = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat,chmod,fchmod",
                               sys.executable, "-m", "cis490fleet", "enroll", *map(str, argv)],
                              env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                              preexec_fn=lambda: os.umask(0o022))
        assert proc.returncode == 0, proc.stderr
        created = {}
        for line in trace.read_text().splitlines():
            found = re.search(r'openat\(AT_FDCWD, "([^"]*)", ([A-Z_|]+), (0\d+)\)', line)
            if found and "O_CREAT" in found.group(2) and str(root) in found.group(1):
                created[Path(found.group(1)).name] = int(found.group(3), 8) & ~0o022
        secrets = {name: mode for name, mode in created.items()
                   if any(s in name for s in ("host-signing.key", "host.key", "operator.token", "cluster.key"))}
        assert secrets, created
        assert argv[0] == "worker" or any("cluster.key" in name for name in secrets), created
        assert all(mode & 0o037 == 0 for mode in secrets.values()), secrets


def test_windows_secrets_get_their_acl_before_a_byte_is_written(tmp_path, pyz, capsys):
    root = tmp_path / "root"
    key_file = tmp_path / "given.key"
    key_file.write_text(KEY)
    rc, out = enroll_main(capsys, "worker", "--os", "windows", "--root", root, "--pyz", pyz,
                          "--receiver", "https://coord.lab:8445", "--host-id", "win1", "--skip-coordinator-check",
                          "--python", r"C:\Python311\python.exe", "--program-data", r"C:\ProgramData",
                          "--host-key-file", key_file)
    assert rc == 0, out
    lines = out.splitlines()
    acl = next(i for i, line in enumerate(lines) if "icacls" in line and "host-signing.key" in line)
    created = next(i for i, line in enumerate(lines) if line.startswith(r"created C:\ProgramData\cis490fleet"
                                                                          r"\host-signing.key"))
    assert acl < created
    assert ("/inheritance:r /grant:r *S-1-5-18:(F) /grant:r *S-1-5-32-544:(F) /grant:r *S-1-5-20:(R)"
            in lines[acl])
    task = ET.fromstring((root / "ProgramData/cis490fleet/cis490fleet-worker.xml").read_bytes())
    assert task.find("t:Actions/t:Exec/t:Arguments", TASK_NS).text.endswith(
        r"--host-key-file C:\ProgramData\cis490fleet\host-signing.key")


def test_install_script_pins_the_zipapp_and_restricts_the_key_before_writing_it():
    text = (ROOT / "cis490fleet" / "windows" / "install-worker.ps1").read_text()
    assert "x-content-sha256" not in text  # a header of the same response proves nothing
    assert "$actual -ne $ZipappSha256.ToLowerInvariant()" in text
    assert "-not $Insecure" in text and "^http://" in text
    secret = text[text.index("function Write-Secret"):]
    secret = secret[:secret.index("\n}\n")]
    assert secret.index("Set-SecretAcl") < secret.index("WriteAllText($part, $Text")  # the ACL first, then the key
    assert "/inheritance:r" in text and "*S-1-5-18:(F)" in text and "*S-1-5-32-544:(F)" in text


# -- the cluster key a new peer needs -----------------------------------------------------------

CLUSTER_ENV = "/etc/cis490fleet/coordinator.env"
CLUSTER_KEY = "/etc/cis490fleet/cluster.key"


def serve_args_of(files: dict) -> str:
    env = files[CLUSTER_ENV][2].decode()
    return next(line for line in env.splitlines() if line.startswith("CIS490FLEET_SERVE_ARGS="))


def test_the_cluster_key_comes_on_stdin_lands_for_the_service_only_and_serve_is_given_it(tmp_path, pyz):
    root = tmp_path / "root"
    env = clean_env()
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "cis490fleet", "enroll", "coordinator", "--root", str(root), "--pyz", str(pyz)]
    proc = subprocess.run(argv + ["--cluster-key-file", "-"], input=KEY + "\n", env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert KEY not in proc.stdout + proc.stderr
    files = snapshot(root)
    assert files[CLUSTER_KEY][1:] == (0o640, (KEY + "\n").encode())
    assert serve_args_of(files).endswith(f" --cluster-key-file {CLUSTER_KEY}")
    assert files["/etc/systemd/system/cis490fleet-coordinator.service"][2].decode() == \
        enroll.render_coordinator_unit()
    # A later run without the flag keeps the key and the serve options as they are.
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    again = snapshot(root)
    assert again[CLUSTER_KEY] == files[CLUSTER_KEY] and again[CLUSTER_ENV] == files[CLUSTER_ENV]


def test_the_key_the_first_peer_created_is_the_one_the_new_peer_serves_with(tmp_path, pyz, capsys):
    from cis490fleet import auth

    first = tmp_path / "first-peer-cluster.key"
    created = auth.load_or_create_key(str(first), "--cluster-key-file")
    root = tmp_path / "root"
    rc, out = enroll_main(capsys, "coordinator", "--root", root, "--pyz", pyz, "--cluster-key-file", first)
    assert rc == 0, out
    assert f"created {CLUSTER_KEY} (mode 0640, group {enroll.SERVICE_USER})" in out
    assert auth.load_or_create_key(str(root / CLUSTER_KEY.lstrip("/")), "--cluster-key-file") == created
    rc, out = enroll_main(capsys, "coordinator", "--root", root, "--pyz", pyz, "--cluster-key-file", first)
    assert rc == 0 and f"unchanged {CLUSTER_KEY}" in out


@pytest.mark.parametrize("given", ["", "short", "g" * 64, KEY + KEY])
def test_a_bad_cluster_key_is_refused_and_nothing_is_written(tmp_path, pyz, given):
    key_file = tmp_path / "cluster.key"
    key_file.write_text(given)
    root = tmp_path / "root"
    with pytest.raises(errors.ConfigError, match=r"--cluster-key-file .*cluster\.key does not hold a key: "
                                                 r"expected 64 hex digits"):
        enroll.main(["coordinator", "--root", str(root), "--pyz", str(pyz), "--cluster-key-file", str(key_file)])
    assert not root.exists()


def test_a_missing_cluster_key_file_names_the_flag(tmp_path, pyz):
    proc = run_cli("enroll", "coordinator", "--root", tmp_path / "root", "--pyz", pyz,
                   "--cluster-key-file", tmp_path / "absent.key")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--cluster-key-file" in proc.stderr and "absent.key" in proc.stderr
    assert not (tmp_path / "root").exists()


def test_dry_run_shows_the_cluster_key_it_would_install_and_writes_nothing(tmp_path, pyz, capsys):
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    root = tmp_path / "root"
    rc, out = enroll_main(capsys, "coordinator", "--root", root, "--pyz", pyz, "--dry-run",
                          "--cluster-key-file", key_file)
    assert rc == 0, out
    assert f"would write {CLUSTER_KEY} (65 bytes, mode 0640, group {enroll.SERVICE_USER})" in out
    assert KEY not in out
    assert not root.exists() or snapshot(root) == {}


def test_a_key_given_to_an_existing_coordinator_says_how_to_pass_it_to_serve(tmp_path, pyz, capsys):
    root = tmp_path / "root"
    assert enroll_main(capsys, "coordinator", "--root", root, "--pyz", pyz)[0] == 0
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    rc, out = enroll_main(capsys, "coordinator", "--root", root, "--pyz", pyz, "--cluster-key-file", key_file)
    assert rc == 0, out
    assert snapshot(root)[CLUSTER_KEY][2] == (KEY + "\n").encode()
    assert (f"add --cluster-key-file {CLUSTER_KEY} to CIS490FLEET_SERVE_ARGS in {CLUSTER_ENV}, then "
            "systemctl restart cis490fleet-coordinator") in out


def test_uninstall_removes_the_cluster_key(tmp_path, pyz, capsys):
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    root = tmp_path / "root"
    assert enroll_main(capsys, "coordinator", "--root", root, "--pyz", pyz, "--cluster-key-file", key_file)[0] == 0
    assert enroll_main(capsys, "uninstall", "--root", root)[0] == 0
    assert CLUSTER_KEY not in snapshot(root)
