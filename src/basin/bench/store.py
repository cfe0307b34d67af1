"""Run storage: one SQLite file (standard-library ``sqlite3``).

URLs follow SQLAlchemy's (and so Optuna's) form -- ``sqlite:///relative/path.db``,
``sqlite:////absolute/path.db`` -- or a plain file path. Each run is one row keyed by the
hash of its full configuration, written in a single transaction, so a killed sweep leaves
only complete records and a rerun skips what is stored. Runs with ``status="failed"`` do not
count as stored (they are retried).

Several processes may share one file. A worker *claims* a run before training it: a row in
``basin_claims`` naming its owner (host, pid) with a lease that a heartbeat renews, taken in
a ``BEGIN IMMEDIATE`` transaction so that two workers never both hold it. A claim whose owner
is gone -- on this host: its process no longer exists; anywhere: its lease expired -- is
taken over. Storing a finished run releases its claim in the same transaction and never
replaces a finished run (the first one stored wins), so each run is stored exactly once.

Every database error (a damaged file, a locked database past the timeout, a row that is not
valid JSON) raises ``ValueError`` with one line naming the storage; the schema is created on
the first write, so reading a damaged file writes nothing to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import interrupts

__all__ = ["DEFAULT_STORAGE", "LEASE", "Store", "owner_gone", "pid_alive", "sqlite_path"]

DEFAULT_STORAGE = "sqlite:///results/basin.db"
LEASE = 60.0  # seconds a claim lives without a heartbeat (renewed every LEASE / 4)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS basin_runs (
    key TEXT PRIMARY KEY,
    workload TEXT NOT NULL,
    optimizer TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    grp TEXT NOT NULL,
    created TEXT NOT NULL,
    version TEXT,
    git_rev TEXT,
    config TEXT NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS basin_runs_workload ON basin_runs (workload, optimizer);
CREATE TABLE IF NOT EXISTS basin_claims (
    key TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    expires REAL NOT NULL
);
"""
_COLUMNS = "key, workload, optimizer, seed, status, grp, created, version, git_rev, config, result"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def owner_gone(host: str, pid: int, expires: float, now: float | None = None) -> bool:
    """Whether a claim's owner is gone: its lease expired, or it ran on this host and its
    process no longer exists."""
    now = time.time() if now is None else now
    if expires < now:
        return True
    return host == socket.gethostname() and pid != os.getpid() and not pid_alive(pid)


def sqlite_path(url: str) -> str:
    """File path of a storage URL; ``ValueError`` for anything that is not SQLite."""
    url = str(url).strip()
    if not url:
        raise ValueError("storage URL is empty; use sqlite:///path.db")
    if "://" in url:
        scheme, _, rest = url.partition("://")
        if scheme.lower() != "sqlite":
            raise ValueError(
                f"unsupported storage URL {url!r}: only SQLite is supported (sqlite:///path.db)"
            )
        if not rest.startswith("/") or rest == "/":
            raise ValueError(f"malformed storage URL {url!r}: use sqlite:///path.db")
        path = rest[1:]  # sqlite:///rel.db -> rel.db ; sqlite:////abs.db -> /abs.db
        if path in ("", ":memory:"):
            return ":memory:"
        return path
    return url


class Store:
    """Runs in one SQLite database. ``create=False`` refuses a file that does not exist.

    Any problem opening it (missing directory that cannot be created, not a database,
    unreadable) raises ``ValueError`` with one line naming the URL."""

    def __init__(self, url: str = DEFAULT_STORAGE, *, create: bool = True) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._schema = False
        fresh = self.path == ":memory:"
        if self.path != ":memory:":
            p = Path(self.path)
            if p.is_dir():
                raise ValueError(f"storage {url!r} is a directory, not a database file")
            if not p.exists():
                if not create:
                    raise ValueError(f"storage {url!r} does not exist")
                try:
                    p.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ValueError(f"cannot create storage {url!r}: {exc.strerror}") from None
                fresh = True
            elif create and p.stat().st_size == 0:
                fresh = True
        try:
            self.conn = self._connect()
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open storage {url!r}: {exc}") from None
        if create and fresh:  # an existing file gets its tables on the first write
            self._ensure_schema()

    def _connect(self, timeout: float = 60.0) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        return conn

    # --------------------------------------------------------------- plumbing

    def _read(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise ValueError(f"cannot read storage {self.url!r}: {exc}") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed at the end of the block, rolled
        back on any exception; database errors become ``ValueError``. A Ctrl-C is held until
        the transaction has ended (:mod:`basin.bench.interrupts`)."""
        c = self.conn
        with interrupts.hold():
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    yield c
                except BaseException:
                    if c.in_transaction:
                        c.execute("ROLLBACK")
                    raise
                c.execute("COMMIT")
            except sqlite3.Error as exc:
                if c.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        c.execute("ROLLBACK")
                raise ValueError(f"cannot write to storage {self.url!r}: {exc}") from None

    def _ensure_schema(self) -> None:
        if self._schema:
            return
        with self._write() as c:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
        self._schema = True

    def _has_table(self, name: str = "basin_runs") -> bool:
        rows = self._read("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
        return bool(rows)

    def _loads(self, key: str, text: str) -> dict[str, Any]:
        try:
            return json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise ValueError(
                f"storage {self.url!r}: the record of run {key!r} is not valid JSON ({why}); "
                "delete that row of basin_runs or restore the file from a backup"
            ) from None

    # --------------------------------------------------------------- runs

    def has(self, key: str) -> bool:
        """Whether a finished (ok or diverged) run with this config key is stored."""
        if not self._has_table():
            return False
        rows = self._read("SELECT 1 FROM basin_runs WHERE key = ? AND status != 'failed'", (key,))
        return bool(rows)

    def status(self, key: str) -> tuple[str, str] | None:
        """``(status, created)`` of the stored run with this key, or None."""
        if not self._has_table():
            return None
        rows = self._read("SELECT status, created FROM basin_runs WHERE key = ?", (key,))
        return (rows[0][0], rows[0][1]) if rows else None

    def put(self, result: Any, group: str = "bench") -> bool:
        """Store one run (a ``RunResult`` or its dict) in a single transaction and release
        this process's claim on it. A finished run already stored is never replaced (a
        failed one is): returns whether this record was stored."""
        d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
        cfg = d["config"]
        row = (
            d["key"],
            cfg["workload"],
            cfg["optimizer"],
            int(cfg["seed"]),
            d["status"],
            group,
            d.get("created", ""),
            d.get("version"),
            d.get("git_rev"),
            json.dumps(cfg, sort_keys=True),
            json.dumps(d, sort_keys=True),
        )
        cols = [c.strip() for c in _COLUMNS.split(",")]
        update = ", ".join(f"{c} = excluded.{c}" for c in cols[1:])
        self._ensure_schema()
        with self._write() as c:
            cur = c.execute(
                f"INSERT INTO basin_runs ({_COLUMNS}) VALUES ({', '.join('?' * len(cols))}) "
                f"ON CONFLICT (key) DO UPDATE SET {update} WHERE basin_runs.status = 'failed'",
                row,
            )
            stored = cur.rowcount == 1
            c.execute(
                "DELETE FROM basin_claims WHERE key = ? AND host = ? AND pid = ?",
                (d["key"], self.host, self.pid),
            )
        return stored

    # --------------------------------------------------------------- claims

    def claim(self, key: str, *, lease: float = LEASE) -> bool:
        """Claim run ``key`` for this process: False if it is stored already or a live
        worker holds it; a claim whose owner is gone (see :func:`owner_gone`) is taken over."""
        self._ensure_schema()
        with self._write() as c:
            if c.execute(
                "SELECT 1 FROM basin_runs WHERE key = ? AND status != 'failed'", (key,)
            ).fetchone():
                return False
            row = c.execute(
                "SELECT host, pid, expires FROM basin_claims WHERE key = ?", (key,)
            ).fetchone()
            if row is not None and (row[0], row[1]) != (self.host, self.pid):
                if not owner_gone(row[0], row[1], row[2]):
                    return False
            c.execute(
                "INSERT OR REPLACE INTO basin_claims (key, host, pid, expires) VALUES (?,?,?,?)",
                (key, self.host, self.pid, time.time() + lease),
            )
        return True

    def release(self, key: str) -> None:
        """Give up this process's claim on ``key`` (a run that was not stored)."""
        if not self._has_table("basin_claims"):
            return
        with self._write() as c:
            c.execute(
                "DELETE FROM basin_claims WHERE key = ? AND host = ? AND pid = ?",
                (key, self.host, self.pid),
            )

    def claims(self) -> list[dict[str, Any]]:
        """Current claims: ``key``, ``host``, ``pid``, ``expires`` (seconds since the epoch)."""
        if not self._has_table("basin_claims"):
            return []
        rows = self._read("SELECT key, host, pid, expires FROM basin_claims ORDER BY key")
        return [dict(zip(("key", "host", "pid", "expires"), r, strict=True)) for r in rows]

    @contextlib.contextmanager
    def keep_alive(self, key: str, *, lease: float = LEASE) -> Iterator[None]:
        """Renew this process's claim on ``key`` every ``lease / 4`` seconds (from a thread
        with its own connection) while the block runs."""
        if self.path == ":memory:":
            yield
            return
        stop = threading.Event()
        every = lease / 4

        def beat() -> None:
            try:
                conn = self._connect(timeout=every)
            except sqlite3.Error:
                return
            try:
                while not stop.wait(every):
                    with contextlib.suppress(sqlite3.Error):  # a missed beat: 3 more to go
                        conn.execute(
                            "UPDATE basin_claims SET expires = ? "
                            "WHERE key = ? AND host = ? AND pid = ?",
                            (time.time() + lease, key, self.host, self.pid),
                        )
            finally:
                conn.close()

        t = threading.Thread(target=beat, name="basin-claim-heartbeat", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    # --------------------------------------------------------------- reading

    def get(self, key: str) -> dict[str, Any] | None:
        if not self._has_table():
            return None
        rows = self._read("SELECT result FROM basin_runs WHERE key = ?", (key,))
        return self._loads(key, rows[0][0]) if rows else None

    def runs(
        self,
        workload: str | None = None,
        optimizer: str | None = None,
        group: str | None = None,
        status: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored run records (dicts as ``RunResult.to_dict()``), oldest first."""
        if not self._has_table():
            return []
        sql, args = "SELECT key, result FROM basin_runs WHERE 1=1", []
        for col, val in (
            ("workload", workload),
            ("optimizer", optimizer),
            ("grp", group),
            ("status", status),
        ):
            if val is not None:
                sql += f" AND {col} = ?"
                args.append(val)
        sql += " ORDER BY created, workload, optimizer, seed"
        return [self._loads(k, r) for k, r in self._read(sql, args)]

    def __len__(self) -> int:
        if not self._has_table():
            return 0
        return self._read("SELECT count(*) FROM basin_runs")[0][0]

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
