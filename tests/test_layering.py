"""Guards DESIGN.md's layering: imports point down only, the core does no I/O and reads no clock."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cis490fleet"

LAYERS = {
    "errors": 0, "model": 0, "manifest": 0, "policy": 0, "jobs": 0, "raft": 0, "signing": 0, "failure_text": 0,
    "slots": 0, "bootstrap": 0, "notify": 0, "edge_json": 0, "results": 0, "stop_rules": 0, "submission": 0,
    "commands": 0, "placement": 0,
    "db": 1, "jobstore": 1, "raftstore": 1, "artifacts": 1, "bundle": 1, "capability": 1,
    "checkpoint_records": 1,
    "client": 1, "tls": 1, "zipbuild": 1, "bytecode_cache": 1, "openapi": 1, "metrics": 1, "dashboard": 1,
    "connection_guard": 1, "tokens": 1, "peer_post": 1,
    "manifest_source": 1,
    "http_api": 2, "coordinator": 2, "worker": 2, "ops": 2, "manifest_cmd": 2, "enroll": 2, "trainer": 2, "trainer_ddp": 2,
    "progress": 1, "notifier": 1, "metric_history": 1, "job_inputs": 2, "replication": 2, "worker_config": 1, "worker_view": 1,
    "auth": 2, "hosts_cmd": 2,
    "checkpoint_api": 2, "membership_api": 2, "checkpoint_sync": 2,
    "copy_fetcher": 2,
    "trainer_process": 2, "lease_keeper": 2, "result_outbox": 2,
    "attempt_log": 1, "log_records": 1, "log_api": 2, "lease_clock": 1,
    "cli": 3, "__main__": 3, "__init__": 0, "_build": 0,
}
CORE_FORBIDDEN_IMPORTS = {"sqlite3", "socket", "ssl", "http", "subprocess", "threading", "urllib", "asyncio", "random"}
CORE_FORBIDDEN_CALLS = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter"), ("datetime", "now"),
                        ("random", "random"), ("random", "randint"), ("random", "choice"), ("random", "randrange"),
                        ("os", "urandom"), ("secrets", "token_hex")}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py"))


def imported_names(tree: ast.AST) -> list[tuple[str, int]]:
    """(module name, line) of every import, including function-level (lazy) ones."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "cis490fleet":
                found += [(f"cis490fleet.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


def test_every_module_has_a_layer():
    unknown = [p.stem for p in modules() if p.stem not in LAYERS]
    assert not unknown, f"add these modules to LAYERS in {Path(__file__).name}: {unknown}"


def test_no_module_shadows_the_standard_library():
    shadowing = [p.stem for p in modules() if p.stem in sys.stdlib_module_names]
    assert not shadowing


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_imports_point_down_only(path: Path):
    if path.stem not in LAYERS:
        pytest.skip("unknown module, reported by test_every_module_has_a_layer")
    mine = LAYERS[path.stem]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    upward = []
    for name, line in imported_names(tree):
        if name.startswith("cis490fleet."):
            target = name.split(".")[1]
            if target in LAYERS and LAYERS[target] > mine and path.stem != "cli":
                upward.append(f"line {line}: {name} (layer {LAYERS[target]} > {mine})")
    assert not upward, f"{path.name} imports a higher layer: {upward}"


@pytest.mark.parametrize("path", [p for p in modules() if LAYERS.get(p.stem) == 0], ids=lambda p: p.stem)
def test_core_does_no_io_and_reads_no_clock(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = [f"line {line}: import {name}" for name, line in imported_names(tree)
           if name.split(".")[0] in CORE_FORBIDDEN_IMPORTS and not (path.stem == "raft" and name == "random")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            if (node.func.value.id, node.func.attr) in CORE_FORBIDDEN_CALLS:
                bad.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}()")
    assert not bad, f"{path.name} belongs to the pure core: {bad}"


def test_torch_is_imported_only_by_the_trainers():
    offenders = []
    for path in modules():
        if path.stem in ("trainer", "trainer_ddp"):
            continue
        for name, line in imported_names(ast.parse(path.read_text(encoding="utf-8"))):
            if name.split(".")[0] == "torch":
                offenders.append(f"{path.name}:{line}")
    assert not offenders
