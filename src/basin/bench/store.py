"""Run storage: one SQLite file (standard-library ``sqlite3``).

URLs follow SQLAlchemy's (and so Optuna's) form -- ``sqlite:///relative/path.db``,
``sqlite:////absolute/path.db`` -- or a plain file path. Each run is one row keyed by the
hash of its full configuration, written in a single transaction, so a killed sweep leaves
only complete records and a rerun skips what is stored. Runs with ``status="failed"`` do not
count as stored (they are retried).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_STORAGE", "Store", "sqlite_path"]

DEFAULT_STORAGE = "sqlite:///results/basin.db"

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
"""


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
        try:
            self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.conn.execute("PRAGMA busy_timeout = 60000")
            if create:
                self.conn.executescript(_SCHEMA)
            else:
                self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open storage {url!r}: {exc}") from None

    # --------------------------------------------------------------- runs

    def _has_table(self) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='basin_runs'"
        ).fetchone()
        return row is not None

    def has(self, key: str) -> bool:
        """Whether a finished (ok or diverged) run with this config key is stored."""
        if not self._has_table():
            return False
        row = self.conn.execute(
            "SELECT 1 FROM basin_runs WHERE key = ? AND status != 'failed'", (key,)
        ).fetchone()
        return row is not None

    def put(self, result: Any, group: str = "bench") -> None:
        """Store one run (a ``RunResult`` or its dict) in a single transaction."""
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
        try:
            with self.conn:  # BEGIN ... COMMIT, or ROLLBACK on error
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.execute(
                    "INSERT OR REPLACE INTO basin_runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", row
                )
        except sqlite3.Error as exc:
            raise ValueError(f"cannot write to storage {self.url!r}: {exc}") from None

    def get(self, key: str) -> dict[str, Any] | None:
        if not self._has_table():
            return None
        row = self.conn.execute("SELECT result FROM basin_runs WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

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
        sql, args = "SELECT result FROM basin_runs WHERE 1=1", []
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
        try:
            rows = self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise ValueError(f"cannot read storage {self.url!r}: {exc}") from None
        return [json.loads(r[0]) for r in rows]

    def __len__(self) -> int:
        if not self._has_table():
            return 0
        return self.conn.execute("SELECT count(*) FROM basin_runs").fetchone()[0]

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
