"""The usage ledger: one SQLite row per request, written off the request path.

``<data_dir>/usage.sqlite3`` (WAL), table ``usage``: time (unix seconds),
key name, dialect, backend, model, prompt / completion / cached tokens, cost
in USD and outcome.  Never a key's secret: only configured names.

``record`` puts a row on a bounded queue and returns; one writer thread
drains it, inserting whatever has queued up in one transaction (a batch), so
a burst of requests costs one commit.  After each write the writer lets rows
gather for ``BATCH_INTERVAL_S``: under steady traffic the thread wakes (and
takes the interpreter lock from the requests) a few times a second, not once
per request.  ``close`` flushes what is queued and
stops the thread (the stack calls it on shutdown, after the requests in
flight have ended).  Rows older than ``retention_days`` are deleted at open
and then about once an hour.

Failures never stop inference: a file that cannot be opened (not a database,
no permission) turns the ledger off; a write that fails (the file locked by
another process past the busy timeout) keeps its rows for the next try, at
most ``MAX_PENDING`` of them.  Each kind of failure is logged once.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

log = logging.getLogger(__name__)

FILENAME = "usage.sqlite3"

#: Rows waiting for the writer (queued or kept after a failed write); beyond it new rows are dropped.
MAX_PENDING = 100_000
#: Seconds the writer lets rows gather after a write (``close`` cuts it short).
BATCH_INTERVAL_S = 0.2
#: Seconds a write waits for a lock held by another connection.
BUSY_TIMEOUT_S = 2.0
#: Seconds between retention sweeps.
SWEEP_INTERVAL_S = 3600.0
#: Most groups a report returns.
MAX_GROUPS = 10_000

GROUPS = ("key", "backend", "model")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    ts REAL NOT NULL,
    key TEXT NOT NULL,
    dialect TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
"""


class UsageRow(NamedTuple):
    """One request's row, its fields in the table's column order (a tuple:
    made on every request, handed to ``executemany`` as it is)."""

    ts: float
    key: str
    dialect: str
    backend: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float
    outcome: str


_STOP = object()


class Ledger:
    def __init__(self, path: Path, retention_days: float = 90.0, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.retention_s = retention_days * 86400.0
        self.clock = clock
        self._queue: "queue.Queue[object]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._pending = 0  # queued + kept after a failed write
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._warned: set[str] = set()
        #: Rows written, and rows given up (queue full, or the ledger off).
        self.written = 0
        self.dropped = 0
        self.enabled = False

    # ------------------------------------------------------------ life

    def open(self) -> bool:
        """Check the file (when there is one: a fresh ledger is created with
        its first row, so a server nobody called writes nothing) and start
        the writer; False (logged) when it cannot be opened."""
        try:
            if self.path.exists():
                self._create()
        except (sqlite3.Error, OSError) as e:
            self._warn_once("open", "usage ledger %s cannot be opened (%s): usage is not recorded; budgets count "
                            "from the start of this process", self.path, e)
            return False
        self.enabled = True
        self._closing.clear()
        self._thread = threading.Thread(target=self._writer, name="mlxgate usage ledger", daemon=True)
        self._thread.start()
        return True

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            db.executescript(_SCHEMA)
            db.execute("PRAGMA journal_mode=WAL")
            self._sweep(db)
        finally:
            db.close()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread is None:
            return
        self._closing.set()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        return db

    def _warn_once(self, what: str, msg: str, *args: object) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(msg, *args)

    # ------------------------------------------------------------ writing

    def record(self, row: UsageRow) -> None:
        """Queue ``row`` (never blocks)."""
        if not self.enabled:
            return
        with self._lock:
            if self._pending >= MAX_PENDING:
                self.dropped += 1
                full = True
            else:
                self._pending += 1
                full = False
        if full:
            self._warn_once("full", "usage ledger: %d rows waiting to be written; new rows are dropped",
                            MAX_PENDING)
            return
        self._queue.put(row)

    def _writer(self) -> None:
        db: Optional[sqlite3.Connection] = None
        kept: list[UsageRow] = []
        last_sweep = time.monotonic()
        stop = False
        while not stop:
            item = self._queue.get()
            batch = kept
            kept = []
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, UsageRow):
                    batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if not batch:
                continue
            try:
                if db is None:
                    self._create()
                    db = self._connect()
                with db:
                    db.execute("BEGIN")
                    db.executemany("INSERT INTO usage VALUES (?,?,?,?,?,?,?,?,?,?)", batch)
                with self._lock:
                    self._pending -= len(batch)
                self.written += len(batch)
                if "write" in self._warned:
                    log.info("usage ledger: writing again (%d rows)", len(batch))
                    self._warned.discard("write")
            except (sqlite3.Error, OSError) as e:
                self._warn_once("write", "usage ledger %s cannot be written (%s): keeping %d rows for the next try",
                                self.path, e, len(batch))
                kept = batch
                if stop:
                    with self._lock:
                        self._pending -= len(kept)
                    self.dropped += len(kept)
                    log.warning("usage ledger: %d rows could not be written before shutdown", len(kept))
            if time.monotonic() - last_sweep > SWEEP_INTERVAL_S and db is not None:
                last_sweep = time.monotonic()
                try:
                    self._sweep(db)
                except sqlite3.Error:
                    pass
            if not stop:
                self._closing.wait(BATCH_INTERVAL_S)
        if db is not None:
            db.close()

    def _sweep(self, db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM usage WHERE ts < ?", (self.clock() - self.retention_s,))

    # ------------------------------------------------------------ reading (blocking: call from a thread)

    def spent_since(self, since: float) -> dict[str, float]:
        """Cloud spend (USD) per key name since ``since`` (unix seconds)."""
        rows = self._read("SELECT key, SUM(cost_usd) FROM usage WHERE ts >= ? AND backend LIKE 'cloud:%' "
                          "GROUP BY key", (since,))
        return {k: float(v or 0.0) for k, v in rows}

    def report(self, since: Optional[float], until: Optional[float], group_by: Sequence[str]) -> list[dict]:
        """Totals per group (``GROUPS``) between ``since`` and ``until`` (unix seconds, either open)."""
        cols = [g for g in GROUPS if g in group_by]
        where, args = [], []
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        sql = ("SELECT " + "".join(f"{c}, " for c in cols)
               + "COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), SUM(cost_usd) FROM usage"
               + (" WHERE " + " AND ".join(where) if where else "")
               + (" GROUP BY " + ", ".join(cols) if cols else "")
               + " ORDER BY SUM(cost_usd) DESC, COUNT(*) DESC LIMIT ?")
        out = []
        for row in self._read(sql, (*args, MAX_GROUPS)):
            named = dict(zip(cols, row[:len(cols)]))
            requests, prompt, completion, cached, cost = row[len(cols):]
            if not requests:
                continue
            out.append({"key": named.get("key", "*"), "backend": named.get("backend", "*"),
                        "model": named.get("model", "*"), "requests": int(requests),
                        "prompt_tokens": int(prompt or 0), "completion_tokens": int(completion or 0),
                        "cached_tokens": int(cached or 0), "cost_usd": round(float(cost or 0.0), 9)})
        return out

    def _read(self, sql: str, args: tuple) -> list[tuple]:
        if not self.enabled or not self.path.exists():
            return []
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
            try:
                return db.execute(sql, args).fetchall()
            finally:
                db.close()
        except sqlite3.Error as e:
            self._warn_once("read", "usage ledger %s cannot be read (%s)", self.path, e)
            return []

    def flushed(self) -> bool:
        """No row waits to be written (tests poll it)."""
        return self._pending == 0
