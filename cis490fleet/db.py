"""SQLite plumbing shared by every store: connect with pragmas, one transaction helper, migrations.

Connections are opened with ``isolation_level=None`` so that no statement starts
a transaction behind our back: every write goes through ``transaction(conn)``
(``BEGIN IMMEDIATE`` takes the write lock up front, so two writers queue on
``busy_timeout`` instead of failing half-way with SQLITE_BUSY on upgrade).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator

from cis490fleet.errors import ConfigError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def connect(path, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open ``path`` in WAL mode with foreign keys on and a 30 s busy timeout.

    The connection may be closed from another thread (a store closes every
    per-thread connection at shutdown); it is still used by one thread at a time.
    """
    mode = str(synchronous).upper()
    if mode not in SYNCHRONOUS:
        raise ConfigError(f"synchronous={synchronous!r} is not a SQLite mode; use one of {', '.join(SYNCHRONOUS)}")
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        _set_wal(conn)
        conn.execute(f"PRAGMA synchronous = {mode}")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _set_wal(conn: sqlite3.Connection) -> None:
    # Switching a fresh file to WAL can answer SQLITE_BUSY without calling the
    # busy handler when another process is switching it at the same moment.
    for delay in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, None):
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if delay is None or "locked" not in str(exc):
                raise
            time.sleep(delay)
            continue
        if str(mode).lower() != "wal":
            log.warning("SQLite refused WAL mode (journal_mode=%s); concurrent readers will wait on writers", mode)
        return


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` when the body raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def split_statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (semicolons inside strings and triggers are kept)."""
    out: list[str] = []
    buf = ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \t\r\n;"):
                out.append(buf.strip())
            buf = ""
    if buf.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buf.strip()[:60]!r}")
    return out


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection, migrations: list[str], *, what: str = "database") -> int:
    """Bring the schema to ``len(migrations)``; ``PRAGMA user_version`` counts the applied ones.

    All pending migrations run in one transaction, so a crash leaves the old
    schema, and two processes opening a fresh file do not both apply them.
    A file written by a newer program is refused rather than misread.
    """
    target = len(migrations)
    with transaction(conn):
        current = schema_version(conn)
        if current > target:
            raise ConfigError(
                f"{what} has schema version {current} but this program knows only up to {target}; "
                "run the newer cis490fleet that wrote it")
        for index in range(current, target):
            for statement in split_statements(migrations[index]):
                conn.execute(statement)
        if current != target:
            conn.execute(f"PRAGMA user_version = {target}")
            log.info("migrated %s schema from version %d to %d", what, current, target)
    return target
