"""The lab's SQLite database: schema, migrations of older databases, and every
query the server makes. One connection, serialised by a lock (writes are
sub-millisecond); WAL journal, so a reader never waits for a writer."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sqlite3
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

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = threading.Lock()
        self._samples: dict[str, dict] = {}
        memory = str(path) == ":memory:"
        if not memory and self.path.is_dir():
            raise IsADirectoryError(f"database {path} is a folder; give a file path "
                                    f"such as {self.path / 'lab.sqlite3'}")
        if not memory and self.path.is_file() and self.path.stat().st_size == 0:
            # SQLite takes a 0-byte file as a new database; it may be one that lost its data
            log.warning("database %s is an empty (0-byte) file: starting a new, empty lab there. "
                        "If it held samples, stop the server and restore it from a backup", path)
        try:
            if not memory:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(SCHEMA)
            self._upgrade()
        except (sqlite3.Error, OSError) as e:
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
        with self.lock:
            self.conn.close()

    def _q(self, sql, args=()):
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    # samples
    def sample_for_name(self, name: str) -> dict:
        """The sample called ``name``, created if new (samples are never renamed or
        deleted, so lookups are cached)."""
        with self.lock:
            if name in self._samples:
                return self._samples[name]
            row = self.conn.execute("SELECT * FROM samples WHERE name=?", (name,)).fetchone()
            if row is None:
                sid = secrets.token_hex(6)
                self.conn.execute("INSERT INTO samples VALUES (?,?,?)", (sid, name, now()))
                row = self.conn.execute("SELECT * FROM samples WHERE id=?", (sid,)).fetchone()
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
        with self.lock:
            self.conn.execute("BEGIN")
            try:
                for k, row in enumerate(rows):
                    old = self.conn.execute("SELECT id, file_name FROM cells WHERE sample_id=? AND image_sha1=?",
                                            (row["sample_id"], row["image_sha1"])).fetchone()
                    if old is not None:
                        dupes[k] = dict(old)
                        continue
                    self.conn.execute(_INSERT_CELL, row)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
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
        with self.lock:
            row = self.conn.execute("SELECT predicted_class, true_class FROM cells WHERE id=?",
                                    (cid,)).fetchone()
            if row is None:
                return None
            ts = now()
            self.conn.execute("BEGIN")
            try:
                self.conn.execute("UPDATE cells SET true_class=?, corrected_at=? WHERE id=?",
                                  (true_class, ts if true_class else None, cid))
                self.conn.execute("INSERT INTO corrections (cell_id, created, previous_prediction, "
                                  "previous_true_class, true_class) VALUES (?,?,?,?,?)",
                                  (cid, ts, row["predicted_class"], row["true_class"], true_class))
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
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
    d["class"] = d["true_class"] or d["predicted_class"]  # what the differential counts
    d["corrected"] = d["true_class"] is not None
    return d
