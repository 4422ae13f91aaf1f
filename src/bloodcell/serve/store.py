"""The lab's SQLite database: schema, migrations of older databases, and every
query the server makes. One connection, serialised by a lock (writes are
sub-millisecond); WAL journal, so a reader never waits for a writer.

Safety: the file is checked (``PRAGMA quick_check``, WAL included) before use; one
server per database (a lock file beside it); a write waits for another program's
write lock (BEGIN IMMEDIATE + busy timeout) and is committed (synchronous=FULL)
before the server answers, so an acknowledged write survives a crash; closing
checkpoints the WAL into the main file. ``backup`` copies a live database."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("bloodcell")

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
  id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
  id TEXT PRIMARY KEY, sample_id TEXT NOT NULL REFERENCES samples(id),
  file_name TEXT NOT NULL, media_type TEXT, image BLOB NOT NULL, created TEXT NOT NULL,
  model_version TEXT, predicted_class TEXT NOT NULL, probability REAL NOT NULL,
  probabilities TEXT NOT NULL, top3 TEXT NOT NULL, needs_review INTEGER NOT NULL,
  multi_cell INTEGER, multi_cell_score REAL, n_regions INTEGER,
  true_class TEXT, corrected_at TEXT, input_warnings TEXT, image_sha1 TEXT);
CREATE INDEX IF NOT EXISTS cells_sample ON cells(sample_id);
CREATE TABLE IF NOT EXISTS corrections (
  id INTEGER PRIMARY KEY AUTOINCREMENT, cell_id TEXT NOT NULL REFERENCES cells(id),
  created TEXT NOT NULL, previous_prediction TEXT NOT NULL, previous_true_class TEXT,
  true_class TEXT);
"""
_CELL_COLS = ("id, sample_id, file_name, media_type, created, model_version, predicted_class, probability, "
              "probabilities, top3, needs_review, multi_cell, multi_cell_score, n_regions, "
              "true_class, corrected_at, input_warnings")
_INSERT_CELL = (
    "INSERT INTO cells (id, sample_id, file_name, media_type, image, created, model_version, "
    "predicted_class, probability, probabilities, top3, needs_review, multi_cell, multi_cell_score, "
    "n_regions, input_warnings, image_sha1) VALUES (:id, :sample_id, :file_name, :media_type, :image, "
    ":created, :model_version, :predicted_class, :probability, :probabilities, :top3, :needs_review, "
    ":multi_cell, :multi_cell_score, :n_regions, :input_warnings, :image_sha1)")


BUSY_TIMEOUT_S = 30.0  # how long a write waits for another program's write lock


class StoreBusy(OSError):
    """Another program held the write lock past BUSY_TIMEOUT_S: nothing was written."""


def default_db_path() -> Path:
    if os.environ.get("BLOODCELL_DB"):
        return Path(os.environ["BLOODCELL_DB"])
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "bloodcell" / "lab.sqlite3"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Store:
    """The database. Opening it creates or upgrades the schema; errors are an OSError
    naming the file (`bloodcell serve --db` prints one line, not a sqlite3 traceback)."""

    def __init__(self, path: str | os.PathLike, exclusive: bool = True, read_only: bool = False):
        """``read_only``: an existing lab database, opened for reading only (``bloodcell
        adapt --db``): nothing is created, upgraded or locked."""
        if read_only:
            exclusive = False
        self.path = Path(path)
        self.lock = threading.Lock()
        self._samples: dict[str, dict] = {}
        self._lock_file = None
        memory = str(path) == ":memory:"
        if not memory and self.path.is_dir():
            raise IsADirectoryError(f"database {path} is a folder; give a file path "
                                    f"such as {self.path / 'lab.sqlite3'}")
        try:
            if not memory:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if exclusive:
                    self._lock_file = _lock_database(self.path)
            empty = not memory and self.path.is_file() and self.path.stat().st_size == 0
            if empty and read_only:
                raise OSError("an empty (0-byte) file, not a lab database")
            if empty:
                # SQLite takes a 0-byte file as a new database; it may be one that lost its data
                log.warning("database %s is an empty (0-byte) file: starting a new, empty lab there. "
                            "If it held samples, stop the server and restore it from a backup", path)
            self.conn = (sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                         check_same_thread=False, timeout=BUSY_TIMEOUT_S) if read_only else
                         sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                         timeout=BUSY_TIMEOUT_S))
            self.conn.row_factory = sqlite3.Row
            _check_integrity(self.conn, self.path)
            _check_is_lab(self.conn, read_only)
            if not read_only:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the answer
                self.conn.execute("PRAGMA foreign_keys=ON")
                self.conn.executescript(SCHEMA)
                self._upgrade()
        except BaseException as e:
            self._unlock()
            if isinstance(e, DatabaseDamaged) or not isinstance(e, (sqlite3.Error, OSError)):
                raise
            if isinstance(e, sqlite3.DatabaseError) and "malformed" in str(e):
                raise DatabaseDamaged(_damaged(self.path, str(e))) from None
            raise OSError(f"cannot use database {path}: {e}") from None

    def _upgrade(self):
        """Databases of earlier versions: add the newer columns. input_warnings stays
        NULL (not checked); image_sha1 is filled in, so duplicates are found there too."""
        cols = {r[1] for r in self.conn.execute("PRAGMA table_info(cells)")}
        if "input_warnings" not in cols:
            self.conn.execute("ALTER TABLE cells ADD COLUMN input_warnings TEXT")
        if "image_sha1" not in cols:
            self.conn.execute("ALTER TABLE cells ADD COLUMN image_sha1 TEXT")
            for cid, image in self.conn.execute("SELECT id, image FROM cells").fetchall():
                self.conn.execute("UPDATE cells SET image_sha1=? WHERE id=?",
                                  (hashlib.sha1(image).hexdigest(), cid))
        self.conn.execute("CREATE INDEX IF NOT EXISTS cells_sample_sha ON cells(sample_id, image_sha1)")

    def close(self):
        """Checkpoint the WAL into the main file (a copy of lab.db alone is then complete),
        close, and free the database for another server."""
        with self.lock:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.close()
        self._unlock()

    def _unlock(self):
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None

    def _q(self, sql, args=()):
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def _write(self):
        """One write transaction. BEGIN IMMEDIATE takes the write lock first, waiting up
        to BUSY_TIMEOUT_S for another writer (a deferred BEGIN that read first failed at
        once with 'database is locked' when another writer committed meanwhile)."""
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StoreBusy(f"database {self.path} is busy ({e}: another program held it for "
                                f"over {BUSY_TIMEOUT_S:g} s); nothing was stored, try again") from None
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    # samples
    def sample_for_name(self, name: str) -> dict:
        """The sample called ``name``, created if new (samples are never renamed or
        deleted, so lookups are cached)."""
        if name in self._samples:
            return self._samples[name]
        with self._write() as conn:
            row = conn.execute("SELECT * FROM samples WHERE name=?", (name,)).fetchone()
            if row is None:
                sid = secrets.token_hex(6)
                conn.execute("INSERT INTO samples VALUES (?,?,?)", (sid, name, now()))
                row = conn.execute("SELECT * FROM samples WHERE id=?", (sid,)).fetchone()
        self._samples[name] = dict(row)
        return dict(row)

    def get_sample(self, sid: str) -> dict | None:
        rows = self._q("SELECT * FROM samples WHERE id=?", (sid,))
        return dict(rows[0]) if rows else None

    def list_samples(self) -> list[dict]:
        rows = self._q(
            "SELECT s.id, s.name, s.created, COUNT(c.id) AS n_cells, COUNT(c.true_class) AS n_corrected, "
            "MAX(c.created) AS updated FROM samples s LEFT JOIN cells c ON c.sample_id = s.id "
            "GROUP BY s.id ORDER BY COALESCE(MAX(c.created), s.created) DESC, s.rowid DESC")
        return [dict(r) for r in rows]

    # cells
    def add_cells(self, rows: list[dict]) -> dict[int, dict]:
        """Store new cells in one transaction. An image already in the sample (same bytes)
        is not stored again -- a folder dropped twice must not double the differential
        count: returns {row index: the existing cell's id and file_name} for those."""
        dupes = {}
        with self._write() as conn:
            for k, row in enumerate(rows):
                old = conn.execute("SELECT id, file_name FROM cells WHERE sample_id=? AND image_sha1=?",
                                   (row["sample_id"], row["image_sha1"])).fetchone()
                if old is not None:
                    dupes[k] = dict(old)
                    continue
                conn.execute(_INSERT_CELL, row)
        return dupes

    def cells(self, sid: str) -> list[dict]:
        return [_cell_json(r) for r in
                self._q(f"SELECT {_CELL_COLS} FROM cells WHERE sample_id=? ORDER BY rowid", (sid,))]

    def cell(self, cid: str) -> dict | None:
        rows = self._q(f"SELECT {_CELL_COLS} FROM cells WHERE id=?", (cid,))
        return _cell_json(rows[0]) if rows else None

    def cell_image(self, cid: str) -> tuple[bytes, str | None] | None:
        rows = self._q("SELECT image, media_type FROM cells WHERE id=?", (cid,))
        return (rows[0]["image"], rows[0]["media_type"]) if rows else None

    def correct(self, cid: str, true_class: str | None) -> dict | None:
        """Set (or with None, clear) a cell's true class; every change is logged."""
        with self._write() as conn:
            row = conn.execute("SELECT predicted_class, true_class FROM cells WHERE id=?",
                               (cid,)).fetchone()
            if row is None:
                return None
            ts = now()
            conn.execute("UPDATE cells SET true_class=?, corrected_at=? WHERE id=?",
                         (true_class, ts if true_class else None, cid))
            conn.execute("INSERT INTO corrections (cell_id, created, previous_prediction, "
                         "previous_true_class, true_class) VALUES (?,?,?,?,?)",
                         (cid, ts, row["predicted_class"], row["true_class"], true_class))
        return self.cell(cid)

    def corrections(self, cid: str) -> list[dict]:
        return [dict(r) for r in self._q(
            "SELECT created, previous_prediction, previous_true_class, true_class FROM corrections "
            "WHERE cell_id=? ORDER BY id", (cid,))]


def _cell_json(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["probabilities"] = json.loads(d["probabilities"])
    d["top3"] = json.loads(d["top3"])
    d["needs_review"] = bool(d["needs_review"])
    d["input_warnings"] = json.loads(d["input_warnings"]) if d.get("input_warnings") else []
    if d["multi_cell"] is None:
        for k in ("multi_cell", "multi_cell_score", "n_regions"):
            d.pop(k)
    else:
        d["multi_cell"] = bool(d["multi_cell"])
    if (d.get("model_version") or "").startswith("other-labs:"):  # serve.cells.new_cell's mark
        d["model"] = "other-labs"
    d["class"] = d["true_class"] or d["predicted_class"]  # what the differential counts
    d["corrected"] = d["true_class"] is not None
    return d


# ------------------------------------------------------------------ safety

class DatabaseDamaged(OSError):
    """The database file fails SQLite's own check."""


def _damaged(path: Path, problem: str) -> str:
    problem = " ".join(problem.replace("*** in database main ***", "").split())  # one line
    problem = problem if len(problem) <= 160 else problem[:160] + "..."
    return (f"database {path} is damaged ({problem}); the server did not start. To recover: stop "
            f"every program using it, keep a copy of {path.name} and its -wal/-shm files, then "
            f"restore your latest `bloodcell backup` copy, or salvage what is readable with "
            f"`sqlite3 {path} .recover > lab.sql` and `sqlite3 new.db < lab.sql`")


def _check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """PRAGMA quick_check over the database as SQLite sees it, i.e. with the WAL applied
    (a damaged file used to start, and then every page load was a 500)."""
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall() if r[0] != "ok"]
    except sqlite3.DatabaseError as e:
        problems = [str(e)]
    if problems:
        raise DatabaseDamaged(_damaged(path, "; ".join(problems)))


def _check_is_lab(conn: sqlite3.Connection, read_only: bool) -> None:
    """Refuse another program's database: its tables are not the lab's to add to (or read)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    tables.discard("sqlite_sequence")
    if {"samples", "cells"} <= tables:
        if read_only and not {"input_warnings", "image_sha1"} <= {r[1] for r in conn.execute(
                "PRAGMA table_info(cells)")}:
            raise OSError("made by an older bloodcell: open it once with `bloodcell serve --db` "
                          "to upgrade it")
        return
    if tables or read_only:
        listed = ", ".join(sorted(tables)[:5]) + (" ..." if len(tables) > 5 else "")
        raise OSError("not a bloodcell lab database"
                      + (f" (its tables: {listed})" if tables else " (no lab tables)")
                      + ("" if read_only else "; give a new file for the lab"))


def _lock_database(path: Path):
    """An exclusive lock on ``<db>.lock`` for as long as this server runs (the OS frees it
    when the process ends, even by kill -9): a second server on the same database is
    refused instead of racing the first one for the write lock."""
    try:
        import fcntl
    except ImportError:  # Windows: SQLite's own locking and the busy timeout still apply
        return None
    f = open(path.with_name(path.name + ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise OSError(f"database {path} is in use by another bloodcell serve (process {pid}); "
                      f"stop that one first, or give this one another --db") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def backup(db: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Copy a database, also while a server writes to it, with SQLite's online backup
    API: a consistent snapshot (WAL included) in one self-contained file, checked, then
    moved into place atomically. -> counts of what the copy holds."""
    db, out = Path(db), Path(out)
    if not db.is_file():
        raise FileNotFoundError(f"database {db} not found")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name such as {out / db.name}")
    if out.exists() and out.resolve() == db.resolve():
        raise ValueError(f"--out {out} is the database itself; give another file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        src = sqlite3.connect(str(db), timeout=BUSY_TIMEOUT_S)
        dst = sqlite3.connect(tmp)
        try:
            _check_integrity(src, db)
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it
            _check_integrity(dst, out)
            counts = {t: dst.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                      for t in ("samples", "cells", "corrections")}
        finally:
            dst.close()
            src.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return counts
