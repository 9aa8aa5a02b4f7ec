"""Durable Raft state: hard state (term, vote, commit), the log, and the latest snapshot.

Two implementations of one protocol: ``SqliteRaftStore`` (its own file,
``raft.sqlite3``, WAL with ``synchronous=FULL``) and ``MemoryRaftStore``, its
in-memory twin for simulations and tests. The same tests run against both.

The driver must call ``save`` with a Ready's hard state, entries and snapshot
*before* it sends that Ready's messages: a vote or an append acknowledgement
that leaves a node must survive the node's crash (Raft §5.1, Figure 2,
"updated on stable storage before responding to RPCs"). Each call is one
transaction, so a crash leaves either all of it or none.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path
from typing import Protocol

from cis490fleet import db
from cis490fleet.errors import ConfigError
from cis490fleet.raft import HardState, Snapshot, StorageState


class RaftStore(Protocol):
    def load(self) -> StorageState:
        """Everything saved so far, ready for ``RaftNode(storage_state=...)``."""

    def save(self, hard_state: HardState | None, entries: list[dict], snapshot: Snapshot | None) -> None:
        """Persist one Ready: ``snapshot`` replaces the snapshot and the whole log (it came from the leader);
        ``entries`` replace every stored entry from ``entries[0]["index"]`` on; then ``hard_state``."""

    def truncate_prefix(self, index: int, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` (taken at ``index`` by this node) and drop the entries it covers (§7)."""

    def close(self) -> None: ...


def _check_prefix(index: int, snapshot: Snapshot) -> None:
    if snapshot.index != index:
        raise ValueError(f"truncate_prefix({index}) needs the snapshot taken at {index}, got one at {snapshot.index}")


class MemoryRaftStore:
    """Keeps deep copies, so the caller's later changes never leak into what counts as persisted."""

    def __init__(self) -> None:
        self._hard_state = HardState()
        self._snapshot: Snapshot | None = None
        self._entries: list[dict] = []

    def load(self) -> StorageState:
        return StorageState(self._hard_state, copy.deepcopy(self._snapshot), copy.deepcopy(self._entries))

    def save(self, hard_state: HardState | None, entries: list[dict], snapshot: Snapshot | None) -> None:
        if snapshot is not None:
            self._snapshot = copy.deepcopy(snapshot)
            self._entries = []
        if entries:
            first = entries[0]["index"]
            self._entries = [e for e in self._entries if e["index"] < first] + copy.deepcopy(entries)
        if hard_state is not None:
            self._hard_state = hard_state

    def truncate_prefix(self, index: int, snapshot: Snapshot) -> None:
        _check_prefix(index, snapshot)
        if self._snapshot is None or self._snapshot.index < index:
            self._snapshot = copy.deepcopy(snapshot)
        self._entries = [e for e in self._entries if e["index"] > index]

    def last_index(self) -> int:
        if self._entries:
            return self._entries[-1]["index"]
        return self._snapshot.index if self._snapshot else 0

    def holds(self, index: int, term: int) -> bool:
        """Whether entry (index, term) is durable here, in the log or inside the snapshot."""
        if self._snapshot is not None and index <= self._snapshot.index:
            return index < self._snapshot.index or self._snapshot.term == term
        pos = index - (self._entries[0]["index"] if self._entries else 0)
        return bool(self._entries) and 0 <= pos < len(self._entries) and self._entries[pos]["term"] == term

    def close(self) -> None:
        pass


MIGRATIONS = [
    """
    CREATE TABLE hard_state (id INTEGER PRIMARY KEY CHECK (id = 1), term INTEGER NOT NULL,
                             vote TEXT, commit_index INTEGER NOT NULL);
    CREATE TABLE snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), idx INTEGER NOT NULL,
                           term INTEGER NOT NULL, data TEXT);
    CREATE TABLE entries (idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, data TEXT);
    """,
    # Membership (raft.py): a configuration entry's config, and the configuration a snapshot covers.
    """
    ALTER TABLE entries ADD COLUMN config TEXT;
    ALTER TABLE snapshot ADD COLUMN config TEXT;
    """,
]


def _dump(data: object) -> str | None:
    return None if data is None else json.dumps(data, separators=(",", ":"))


def _load(text: str | None) -> object:
    return None if text is None else json.loads(text)


class SqliteRaftStore:
    """The Raft log in its own SQLite file; one connection, used by the driver's thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._conn = db.connect(self.path, synchronous="FULL")
            db.migrate(self._conn, MIGRATIONS, what=f"raft store {self.path}")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path}: cannot open the raft store ({exc}); "
                              "restore it from a backup of this peer, or replace the peer under a new id "
                              "(jobs peers replace OLD NEW=URL); never start this peer id with an empty "
                              "raft store, since a peer that forgot its vote and log can elect a second leader "
                              "in a term or lose committed entries") from exc

    def load(self) -> StorageState:
        conn = self._conn
        row = conn.execute("SELECT term, vote, commit_index FROM hard_state WHERE id = 1").fetchone()
        hard_state = HardState(*row) if row else HardState()
        row = conn.execute("SELECT idx, term, data, config FROM snapshot WHERE id = 1").fetchone()
        snapshot = Snapshot(row[0], row[1], _load(row[2]), _load(row[3])) if row else None
        entries = []
        for i, t, d, c in conn.execute("SELECT idx, term, data, config FROM entries WHERE idx > ? ORDER BY idx",
                                       (snapshot.index if snapshot else 0,)):
            entries.append({"index": i, "term": t, "data": _load(d)} if c is None else
                           {"index": i, "term": t, "data": _load(d), "config": _load(c)})
        return StorageState(hard_state, snapshot, entries)

    def save(self, hard_state: HardState | None, entries: list[dict], snapshot: Snapshot | None) -> None:
        if hard_state is None and not entries and snapshot is None:
            return
        with db.transaction(self._conn) as conn:
            if snapshot is not None:
                self._put_snapshot(conn, snapshot)
                conn.execute("DELETE FROM entries")
            if entries:
                conn.execute("DELETE FROM entries WHERE idx >= ?", (entries[0]["index"],))
                conn.executemany("INSERT INTO entries (idx, term, data, config) VALUES (?, ?, ?, ?)",
                                 [(e["index"], e["term"], _dump(e["data"]), _dump(e.get("config")))
                                  for e in entries])
            if hard_state is not None:
                conn.execute("INSERT OR REPLACE INTO hard_state (id, term, vote, commit_index) VALUES (1, ?, ?, ?)",
                             (hard_state.term, hard_state.vote, hard_state.commit))

    def truncate_prefix(self, index: int, snapshot: Snapshot) -> None:
        _check_prefix(index, snapshot)
        with db.transaction(self._conn) as conn:
            row = conn.execute("SELECT idx FROM snapshot WHERE id = 1").fetchone()
            if row is None or row[0] < index:
                self._put_snapshot(conn, snapshot)
            conn.execute("DELETE FROM entries WHERE idx <= ?", (index,))

    @staticmethod
    def _put_snapshot(conn: sqlite3.Connection, snapshot: Snapshot) -> None:
        conn.execute("INSERT OR REPLACE INTO snapshot (id, idx, term, data, config) VALUES (1, ?, ?, ?, ?)",
                     (snapshot.index, snapshot.term, _dump(snapshot.data), _dump(snapshot.config)))

    def last_index(self) -> int:
        row = self._conn.execute("SELECT MAX(idx) FROM entries").fetchone()
        if row[0] is not None:
            return row[0]
        row = self._conn.execute("SELECT idx FROM snapshot WHERE id = 1").fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        self._conn.close()
