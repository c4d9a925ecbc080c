"""The Responses API's store: stored responses and their input items, in an
embedded SQLite database (``<data_dir>/responses.sqlite3``).

It is the HTTP front's own state for an API only the front speaks: the
inference service knows nothing of it (the proto carries whole
conversations), and this module imports nothing of ``backends``.

**Thread.**  One dedicated thread owns the connection; every operation is a
function run there (``run_in_executor``), so the event loop never waits on
the disk and SQLite is only ever used from one thread.  The database is
opened on first use (a front that never serves ``/v1/responses`` creates no
file) in WAL mode with ``synchronous=NORMAL``: a crash loses at most the last
transactions, never the file.  The file is created readable by its owner
only (0600): it holds conversations.

**Schema.**

- ``responses(seq, id, owner, previous_id, created_at, bytes, items, response)``:
  one row per stored response; ``seq`` is the insertion order (oldest first
  out), ``response`` the Response object's JSON exactly as it was answered
  (``GET`` serves these bytes), ``bytes`` what the row and its items weigh,
  ``items`` how many items (input and output) its turn adds to a conversation.
- ``items(response_seq, position, id, body)``: the response's input items in
  order, each with an id (``GET .../input_items`` pages through them by id).
- ``totals``: one row, the count and bytes of all stored responses, kept in
  the same transactions as the rows (so the bounds cost O(1) to check).
- ``meta``: the schema version and the salt of the owner hashes.

**Bounds.**  At most ``max_count`` responses and ``max_bytes`` bytes
(``ServerConfig.responses_max_count`` / ``responses_max_bytes``): storing one
more removes the oldest first, in the same transaction.  A response that
alone weighs more than ``max_bytes`` is not stored (logged).  Reading a
conversation (``history``) follows ``previous_response_id`` links through
an index, at most ``max_history_items`` items and ``max_history_bytes``
bytes (the front's body limit: a stored conversation costs what the same
history sent in one body would); beyond, a 400.  A link to a response that
is no longer stored (removed to stay within the bounds, or deleted) is a 404
naming it.

**Owners.**  Without API keys every response belongs to everyone (owner "").
With keys, a response belongs to the key that created it: the owner is an
scrypt hash of that key's SHA-256 digest (salted per database), so the file
never holds a key nor a fast hash of one; another key's ids are 404, as if
they did not exist.  Keys are never logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import orjson

log = logging.getLogger(__name__)

T = TypeVar("T")

FILENAME = "responses.sqlite3"
SCHEMA_VERSION = 1

#: scrypt's cost for owner hashes (16 MiB, ~50 ms once per key and process: cached).
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
#: Owner hashes kept per process (only configured keys reach a handler, so a handful).
_MAX_OWNERS = 256
#: Responses removed per query while evicting.
_EVICT_BATCH = 256
#: Ids per ``IN (...)`` query (well under SQLite's variable limit).
_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    previous_id TEXT,
    created_at INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    items INTEGER NOT NULL,
    response BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    response_seq INTEGER NOT NULL,
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (response_seq, position)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_by_id ON items (response_seq, id);
CREATE TABLE IF NOT EXISTS totals (
    one INTEGER PRIMARY KEY CHECK (one = 0),
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
"""


class Unavailable(Exception):
    """The database cannot be used (an unwritable folder, a full disk, a damaged file); logged where
    it happens, with the details."""


class NotFound(Exception):
    """No such response for this owner (missing, deleted, evicted, or another key's)."""

    def __init__(self, response_id: str) -> None:
        super().__init__(response_id)
        self.response_id = response_id


class BrokenChain(Exception):
    """A conversation whose ancestor ``missing`` is no longer stored."""

    def __init__(self, response_id: str, missing: str) -> None:
        super().__init__(missing)
        self.response_id = response_id
        self.missing = missing


class TooLong(Exception):
    """A conversation beyond the history bounds (``what`` says which)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class BadCursor(Exception):
    """``after`` / ``before`` names no input item of the response."""

    def __init__(self, param: str, item_id: str) -> None:
        super().__init__(item_id)
        self.param = param
        self.item_id = item_id


@dataclass
class Page:
    items: list[Any]  # the item objects (parsed JSON)
    has_more: bool


def _ids_in(n: int) -> str:
    return ",".join("?" * n)


def _chunks(values: list[Any]) -> list[list[Any]]:
    return [values[i:i + _CHUNK] for i in range(0, len(values), _CHUNK)]


class ResponseStore:
    """Stored responses (see the module docstring).  Every public method is a
    coroutine that runs its work on the store's own thread."""

    def __init__(
        self,
        path: Path,
        max_count: int,
        max_bytes: int,
        max_history_bytes: int,
        max_history_items: int,
    ) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError("the response store needs max_count >= 1 and max_bytes >= 1")
        self.path = Path(path)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.max_history_bytes = max_history_bytes
        self.max_history_items = max_history_items
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="responses-store")
        self._db: Optional[sqlite3.Connection] = None
        self._salt = b""
        self._owners: dict[bytes, str] = {}
        self._closed = False

    # ---------------------------------------------------------------- plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:  # the app is shutting down
            raise Unavailable("the store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._call, fn, *args))

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            if self._db is None:
                self._open()
            return fn(*args)
        except (sqlite3.Error, OSError) as e:
            log.error("responses store %s: %s: %s", self.path, type(e).__name__, e)
            raise Unavailable(type(e).__name__) from e

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            # The WAL file is cut back to this size after a checkpoint.
            db.execute("PRAGMA journal_size_limit=67108864")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION).encode(),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"{self.path}: unknown schema version {row[0]!r}")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('owner_salt', ?)", (secrets.token_bytes(16),))
            self._salt = db.execute("SELECT value FROM meta WHERE key = 'owner_salt'").fetchone()[0]
        except BaseException:
            db.close()
            raise
        self._db = db
        log.info("responses store: %s", self.path)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def ready(self) -> None:
        """Open the database now if it is not (``Unavailable`` when it cannot be)."""
        await self._run(lambda: None)

    # ---------------------------------------------------------------- owners

    async def owner(self, key_digest: Optional[bytes]) -> str:
        """The owner of what a caller stores and may read: "" without keys."""
        if key_digest is None:
            return ""
        found = self._owners.get(key_digest)
        if found is None:
            found = await self._run(self._owner, key_digest)
        return found

    def _owner(self, key_digest: bytes) -> str:
        if len(self._owners) >= _MAX_OWNERS:
            self._owners.clear()
        owner = hashlib.scrypt(key_digest, salt=self._salt, **_SCRYPT).hex()
        self._owners[key_digest] = owner
        return owner

    # ---------------------------------------------------------------- writes

    async def save(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]]) -> bool:
        """Store a finished response and its input items; False when it alone
        exceeds ``max_bytes`` (then nothing is stored)."""
        blob = orjson.dumps(response)
        bodies = [(str(item.get("id", "")), orjson.dumps(item)) for item in input_items]
        n_items = len(input_items) + len(response.get("output") or ())
        return await self._run(self._save, owner, response, blob, bodies, n_items)

    def _save(self, owner: str, response: dict[str, Any], blob: bytes, bodies: list[tuple[str, bytes]],
              n_items: int) -> bool:
        size = len(blob) + sum(len(b) for _, b in bodies)
        if size > self.max_bytes:
            log.warning("responses store: response %s (%d bytes) is larger than the store (%d bytes): not stored",
                        response["id"], size, self.max_bytes)
            return False
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute(
                "INSERT INTO responses (id, owner, previous_id, created_at, bytes, items, response) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (response["id"], owner, response.get("previous_response_id"), int(time.time()), size, n_items, blob),
            )
            seq = cur.lastrowid
            db.executemany(
                "INSERT INTO items (response_seq, position, id, body) VALUES (?, ?, ?, ?)",
                [(seq, i, item_id, body) for i, (item_id, body) in enumerate(bodies)],
            )
            db.execute("UPDATE totals SET count = count + 1, bytes = bytes + ?", (size,))
            self._evict(seq)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return True

    def _evict(self, keep: int) -> None:
        """Remove the oldest responses until both bounds hold (inside the caller's transaction)."""
        db = self.db
        count, total = db.execute("SELECT count, bytes FROM totals").fetchone()
        removed = 0
        while count > self.max_count or total > self.max_bytes:
            rows = db.execute(
                "SELECT seq, bytes FROM responses WHERE seq != ? ORDER BY seq LIMIT ?", (keep, _EVICT_BATCH)
            ).fetchall()
            if not rows:
                break
            chosen = []
            for seq, size in rows:
                if count <= self.max_count and total <= self.max_bytes:
                    break
                chosen.append(seq)
                count -= 1
                total -= size
            self._delete_seqs(chosen)
            removed += len(chosen)
        if removed:
            log.info("responses store: removed the %d oldest responses to stay within %d responses / %d bytes",
                     removed, self.max_count, self.max_bytes)

    def _delete_seqs(self, seqs: list[int]) -> None:
        db = self.db
        for part in _chunks(seqs):
            marks = _ids_in(len(part))
            size = db.execute(f"SELECT COALESCE(SUM(bytes), 0) FROM responses WHERE seq IN ({marks})", part).fetchone()
            db.execute(f"DELETE FROM items WHERE response_seq IN ({marks})", part)
            n = db.execute(f"DELETE FROM responses WHERE seq IN ({marks})", part).rowcount
            db.execute("UPDATE totals SET count = count - ?, bytes = bytes - ?", (n, size[0]))

    async def delete(self, response_id: str, owner: str) -> bool:
        return await self._run(self._delete, response_id, owner)

    def _delete(self, response_id: str, owner: str) -> bool:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT seq FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).fetchone()
            if row is not None:
                self._delete_seqs([row[0]])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return row is not None

    # ---------------------------------------------------------------- reads

    async def get(self, response_id: str, owner: str) -> Optional[bytes]:
        """The stored Response object's JSON, as it was answered."""
        return await self._run(self._get, response_id, owner)

    def _get(self, response_id: str, owner: str) -> Optional[bytes]:
        row = self.db.execute(
            "SELECT response FROM responses WHERE id = ? AND owner = ?", (response_id, owner)
        ).fetchone()
        return None if row is None else bytes(row[0])

    async def items(
        self, response_id: str, owner: str, limit: int, order: str, after: Optional[str], before: Optional[str]
    ) -> Page:
        """One page of a response's input items (``order`` "asc" or "desc";
        ``after``/``before``: item ids, as the cursor of OpenAI's lists)."""
        return await self._run(self._items, response_id, owner, limit, order, after, before)

    def _items(self, response_id: str, owner: str, limit: int, order: str, after: Optional[str],
               before: Optional[str]) -> Page:
        db = self.db
        row = db.execute("SELECT seq FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).fetchone()
        if row is None:
            raise NotFound(response_id)
        seq = row[0]
        asc = order == "asc"
        clauses, args = ["response_seq = ?"], [seq]
        for param, cursor, forward in (("after", after, True), ("before", before, False)):
            if cursor is None:
                continue
            pos = db.execute(
                "SELECT MIN(position) FROM items WHERE response_seq = ? AND id = ?", (seq, cursor)
            ).fetchone()[0]
            if pos is None:
                raise BadCursor(param, cursor)
            # "after" in this order: greater positions ascending, smaller descending.
            clauses.append("position > ?" if forward == asc else "position < ?")
            args.append(pos)
        rows = db.execute(
            f"SELECT body FROM items WHERE {' AND '.join(clauses)} "
            f"ORDER BY position {'ASC' if asc else 'DESC'} LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        return Page([orjson.loads(r[0]) for r in rows[:limit]], len(rows) > limit)

    async def history(self, response_id: str, owner: str) -> list[dict[str, Any]]:
        """The conversation up to and including ``response_id``, oldest first:
        each stored response's input items, then its output items."""
        return await self._run(self._history, response_id, owner)

    def _history(self, response_id: str, owner: str) -> list[dict[str, Any]]:
        db = self.db
        chain = db.execute(
            """
            WITH RECURSIVE chain(seq, id, previous_id, owner, bytes, items, depth) AS (
                SELECT seq, id, previous_id, owner, bytes, items, 0 FROM responses WHERE id = ?
                UNION ALL
                SELECT r.seq, r.id, r.previous_id, r.owner, r.bytes, r.items, c.depth + 1
                FROM responses r JOIN chain c ON r.id = c.previous_id
                WHERE c.depth < ?
            )
            SELECT seq, id, previous_id, owner, bytes, items FROM chain ORDER BY depth
            """,
            (response_id, self.max_history_items),
        ).fetchall()
        if not chain or chain[0][3] != owner:
            raise NotFound(response_id)
        if len(chain) > self.max_history_items:
            raise TooLong(f"more than {self.max_history_items} responses")
        total_bytes = total_items = 0
        for seq, rid, previous, row_owner, size, n in chain:
            if row_owner != owner:
                raise BrokenChain(response_id, rid)
            total_bytes += size
            total_items += n
            if total_items > self.max_history_items:
                raise TooLong(f"more than {self.max_history_items} items")
            if total_bytes > self.max_history_bytes:
                raise TooLong(f"more than {self.max_history_bytes} bytes")
        oldest_previous = chain[-1][2]
        if oldest_previous is not None:
            raise BrokenChain(response_id, oldest_previous)
        seqs = [row[0] for row in reversed(chain)]  # oldest first
        outputs: dict[int, list[Any]] = {}
        inputs: dict[int, list[Any]] = {seq: [] for seq in seqs}
        for part in _chunks(seqs):
            marks = _ids_in(len(part))
            for seq, blob in db.execute(f"SELECT seq, response FROM responses WHERE seq IN ({marks})", part):
                outputs[seq] = orjson.loads(blob).get("output") or []
            for seq, body in db.execute(
                f"SELECT response_seq, body FROM items WHERE response_seq IN ({marks}) "
                "ORDER BY response_seq, position", part,
            ):
                inputs[seq].append(orjson.loads(body))
        out: list[dict[str, Any]] = []
        for seq in seqs:
            out.extend(inputs[seq])
            out.extend(outputs.get(seq, ()))
        return out

    async def stats(self) -> tuple[int, int]:
        """(responses stored, their bytes)."""
        return await self._run(lambda: tuple(self.db.execute("SELECT count, bytes FROM totals").fetchone()))
