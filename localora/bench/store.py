"""DIR/bench.sqlite: the bench's settings and every finished row, each row its own commit.

    meta       format, settings (JSON), created
    sessions   one per bench command that wrote rows (its argv)
    results    one per (set, seed, method): image, CLIP-T, CLIP-I, work counts
    pairs      one per (set, seed, method, baseline): averaged judge scores and verdicts, every answer
    outcomes   one per (pair, judge, repeat, order): that answer's scores and verdicts, its explanations,
               the judge's name, source and revision

The schema evolves by MIGRATIONS, an append-only list applied in order and counted in SQLite's
`user_version`, so a folder made by any earlier version opens (and is brought up to date) and a
folder made by a later version is refused instead of misread. Never edit a migration that has
shipped: add one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from localora.errors import LocaloraError

DB_FILE = "bench.sqlite"
FORMAT = "localora-bench/1"

# Judge columns are spelled out below; they follow localora.scoring.judge.DIMENSIONS.
# Each migration is plain SQL without BEGIN / COMMIT: migrate() commits it with its number.
MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema (localora 0.1; its folders have user_version 0 and these tables already).
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY, started REAL NOT NULL, argv TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    set_id TEXT NOT NULL, elements INTEGER NOT NULL, seed INTEGER NOT NULL, method TEXT NOT NULL,
    loras TEXT NOT NULL, weights TEXT NOT NULL, prompt TEXT NOT NULL, image TEXT NOT NULL,
    clip_t REAL NOT NULL, clip_i REAL NOT NULL, clip_i_each TEXT NOT NULL,
    renders INTEGER NOT NULL, cache_hits INTEGER NOT NULL, vlm_calls INTEGER NOT NULL,
    seconds REAL NOT NULL, session INTEGER NOT NULL, finished REAL NOT NULL,
    PRIMARY KEY (set_id, seed, method));
CREATE TABLE IF NOT EXISTS pairs (
    set_id TEXT NOT NULL, elements INTEGER NOT NULL, seed INTEGER NOT NULL, method TEXT NOT NULL,
    baseline TEXT NOT NULL,
    composition_a REAL NOT NULL, composition_b REAL NOT NULL, composition TEXT NOT NULL,
    quality_a REAL NOT NULL, quality_b REAL NOT NULL, quality TEXT NOT NULL,
    answers TEXT NOT NULL, vlm_calls INTEGER NOT NULL, seconds REAL NOT NULL,
    session INTEGER NOT NULL, finished REAL NOT NULL,
    PRIMARY KEY (set_id, seed, method, baseline));
""",
    # 2: the renders a search method was given (N (M + 1)); NULL for the baselines and older rows.
    """
ALTER TABLE results ADD COLUMN budget INTEGER;
""",
    # 3: every judge answer as one outcome (GPT4LoRA counts these): one row per (pair, repeat,
    # order), from A's (the method's) side, with the judge model that gave it. Pairs judged by
    # an older localora have none; their `answers` JSON still holds the scores.
    """
CREATE TABLE outcomes (
    set_id TEXT NOT NULL, elements INTEGER NOT NULL, seed INTEGER NOT NULL, method TEXT NOT NULL,
    baseline TEXT NOT NULL, repeat INTEGER NOT NULL, first TEXT NOT NULL, judge TEXT NOT NULL,
    temperature REAL,
    composition_a REAL NOT NULL, composition_b REAL NOT NULL, composition TEXT NOT NULL,
    quality_a REAL NOT NULL, quality_b REAL NOT NULL, quality TEXT NOT NULL,
    explanation_a TEXT NOT NULL, explanation_b TEXT NOT NULL,
    session INTEGER NOT NULL, finished REAL NOT NULL,
    PRIMARY KEY (set_id, seed, method, baseline, repeat, first));
""",
    # 4: CLIP-I per element (category -> cosine) and the reference images it was scored against
    # (LoRA id -> [{"seed", "image"}], seed NULL for a testbed's own file); NULL in older rows,
    # whose CLIP-I used the same-seed single-LoRA render the search had seen.
    """
ALTER TABLE results ADD COLUMN clip_i_elements TEXT;
ALTER TABLE results ADD COLUMN clip_i_references TEXT;
""",
    # 5: several judges (--judges A,B) answer the same (pair, repeat, order): the judge joins the
    # outcomes' key, with the source and revision of its weights; `pairs.judge` names the judge
    # whose averaged scores the pair row holds; `results.vlm` which VLM (JSON: name, source,
    # revision, family) answered a search's calls. NULL in older rows.
    """
CREATE TABLE outcomes_v5 (
    set_id TEXT NOT NULL, elements INTEGER NOT NULL, seed INTEGER NOT NULL, method TEXT NOT NULL,
    baseline TEXT NOT NULL, repeat INTEGER NOT NULL, first TEXT NOT NULL, judge TEXT NOT NULL,
    temperature REAL,
    composition_a REAL NOT NULL, composition_b REAL NOT NULL, composition TEXT NOT NULL,
    quality_a REAL NOT NULL, quality_b REAL NOT NULL, quality TEXT NOT NULL,
    explanation_a TEXT NOT NULL, explanation_b TEXT NOT NULL,
    session INTEGER NOT NULL, finished REAL NOT NULL,
    judge_source TEXT, judge_revision TEXT,
    PRIMARY KEY (set_id, seed, method, baseline, judge, repeat, first));
INSERT INTO outcomes_v5 (set_id, elements, seed, method, baseline, repeat, first, judge, temperature,
    composition_a, composition_b, composition, quality_a, quality_b, quality, explanation_a, explanation_b,
    session, finished)
  SELECT set_id, elements, seed, method, baseline, repeat, first, judge, temperature,
    composition_a, composition_b, composition, quality_a, quality_b, quality, explanation_a, explanation_b,
    session, finished FROM outcomes;
DROP TABLE outcomes;
ALTER TABLE outcomes_v5 RENAME TO outcomes;
ALTER TABLE pairs ADD COLUMN judge TEXT;
ALTER TABLE results ADD COLUMN vlm TEXT;
""",
)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection, where: Path) -> int:
    """The database's schema version; one error line if a newer localora made it."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise LocaloraError(f"{where}: made by a newer localora (bench schema {version}, this version knows "
                            f"{SCHEMA_VERSION}); upgrade localora to open it")
    return version


def migrate(conn: sqlite3.Connection, where: Path) -> None:
    """Apply the migrations this database has not had yet, each whole or not at all."""
    for number in range(schema_version(conn, where) + 1, SCHEMA_VERSION + 1):
        # One script, so the migration and its version number commit together: executescript
        # commits any open transaction first and would otherwise autocommit statement by
        # statement, leaving a failed migration half applied and unnumbered, to fail again.
        try:
            conn.executescript(f"BEGIN;\n{MIGRATIONS[number - 1]}\nPRAGMA user_version = {number};\nCOMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise


class Store:
    """DIR/bench.sqlite: the settings and every finished row; each row is its own commit."""

    def __init__(self, folder: Path, conn: sqlite3.Connection):
        self.folder = folder
        self.conn = conn
        conn.row_factory = sqlite3.Row

    @classmethod
    def create_or_open(cls, folder: Path, settings: dict[str, Any]) -> Store:
        """The bench folder for these settings: new, or an earlier one made with the same settings."""
        folder = Path(folder)
        path = folder / DB_FILE
        existed = path.is_file()
        if not existed and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise LocaloraError(f"{folder}: exists and is not a bench folder (no {DB_FILE}); choose a new --out")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            store = cls(folder, sqlite3.connect(path))
            if existed:  # checked before anything is written to it
                schema_version(store.conn, path)
                store._check(settings)
                migrate(store.conn, path)
                return store
            migrate(store.conn, path)
            with store.conn:
                store.conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("format", FORMAT), ("settings", json.dumps(settings)),
                    ("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))])
        except OSError as e:
            raise LocaloraError(f"{folder}: cannot write the bench folder ({e.strerror}); choose another --out") from None
        except sqlite3.DatabaseError as e:
            raise LocaloraError(f"{path}: not a localora bench database ({e}); choose a new --out") from None
        return store

    @classmethod
    def open(cls, folder: Path) -> Store:
        """An existing bench folder, for reading."""
        folder = Path(folder)
        path = folder / DB_FILE
        if not path.is_file():
            what = "it is empty" if folder.is_dir() and not any(folder.iterdir()) else f"it has no {DB_FILE}"
            if not folder.is_dir():
                what = "it does not exist"
            raise LocaloraError(f"{folder}: not a bench folder ({what}); make one with `localora bench --out {folder}`")
        store = cls(folder, sqlite3.connect(path))
        try:
            fmt = store._meta("format")
        except sqlite3.DatabaseError:
            fmt = None
        if fmt != FORMAT:
            raise LocaloraError(f"{path}: not a localora bench database")
        migrate(store.conn, path)
        return store

    def _meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _check(self, settings: dict[str, Any]) -> None:
        if self._meta("format") != FORMAT:
            raise LocaloraError(f"{self.folder / DB_FILE}: not a localora bench database; choose a new --out")
        stored = self.settings()
        if stored != json.loads(json.dumps(settings)):
            diff = [k for k in sorted(stored.keys() | settings.keys()) if stored.get(k) != settings.get(k)]
            shown = ", ".join(_difference(k, stored.get(k), settings.get(k)) for k in diff)
            raise LocaloraError(f"{self.folder}: made by a bench with other settings ({shown}); "
                                f"rerun with the same settings or choose a new --out")

    def settings(self) -> dict[str, Any]:
        return json.loads(self._meta("settings"))

    def results(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT rowid, * FROM results ORDER BY rowid")]

    def pairs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT rowid, * FROM pairs ORDER BY rowid")]

    def start_session(self, argv: list[str]) -> int:
        with self.conn:
            return self.conn.execute("INSERT INTO sessions (started, argv) VALUES (?, ?)",
                                     (time.time(), json.dumps(argv))).lastrowid

    def outcomes(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT rowid, * FROM outcomes ORDER BY rowid")]

    def add(self, table: str, row: dict[str, Any], children: tuple[tuple[str, dict[str, Any]], ...] = ()) -> None:
        """Insert one finished row and the rows that belong to it (a pair's outcomes) in one
        commit; they are on disk when this returns, all or none."""
        with self.conn:
            for name, values in ((table, row), *children):
                self.conn.execute(f"INSERT INTO {name} ({', '.join(values)}) VALUES "
                                  f"({', '.join(':' + k for k in values)})", values)


def _difference(key: str, stored: Any, given: Any) -> str:
    if isinstance(stored, (dict, list)) or isinstance(given, (dict, list)):
        return f"{key} differ"
    return f"{key} {stored!r} there, {given!r} now"
