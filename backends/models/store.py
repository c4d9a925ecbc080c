"""Where managed models live, and what each name means.

Layout under ``root`` (``<models_dir>/.mlxgate-store``; the registry's scan of
``models_dir`` skips it, having no config.json)::

    manifests.sqlite3          one row per name: its snapshot and its settings
    snapshots/<id>/            complete, verified model folders (read-only use)
    partial/<id>/              downloads and builds in progress (never served)
    blobs/sha256-<hex>         files uploaded with POST /api/blobs/sha256:<hex>

A name is a row, never a folder: ``copy`` adds a row pointing at the same
snapshot, ``delete`` removes a row and then every snapshot no row refers to.
A model created from another one refers to the *snapshot* it was built on,
not to the other name, so deleting the base leaves it working.

Every path this module hands out comes from ``path_of``: store-made ids and
digests checked against a pattern, joined under ``root`` and checked again to
stay there.  ``member_path`` does the same for a file inside a snapshot
(names listed by a hub or sent in ``files``).  Folders move from ``partial/``
to ``snapshots/`` with one ``os.replace`` (same file system), so a model
appears complete or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

from backends.errors import InvalidArgument, ModelNotFound
from backends.models.names import store_key
from mlxgate.limits import clip_name

log = logging.getLogger(__name__)

STORE_DIRNAME = ".mlxgate-store"
AREAS = ("snapshots", "partial", "blobs")
_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
#: A file inside a model folder: relative, no "..", no hidden parts, printable.
_MEMBER_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}")
_MAX_MEMBER_DEPTH = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    key        TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    snapshot   TEXT NOT NULL,
    spec       TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass
class StoredModel:
    """One name's manifest.  ``spec`` fields are Ollama's ``create`` fields."""

    name: str
    snapshot: str
    created_at: float = field(default_factory=time.time)
    #: Where the snapshot came from: {"repo", "revision", "commit"} for a pull,
    #: {"from": name} or {"files": {...}} for a create.
    source: dict = field(default_factory=dict)
    system: str = ""
    template: str = ""
    #: Ollama option name -> value (``stop`` holds a list).
    parameters: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)
    license: list = field(default_factory=list)
    #: Snapshot ids of LoRA adapter folders, applied at load.
    adapters: list = field(default_factory=list)
    #: What ``create`` quantized to ("q4_K_M" ...), "" if not.
    quantization: str = ""

    def spec(self) -> dict:
        d = asdict(self)
        for k in ("name", "snapshot", "created_at"):
            d.pop(k)
        return d


def digest_hex(digest: str) -> str:
    """The 64 hex digits of ``sha256:<hex>`` (or ``sha256-<hex>``), else InvalidArgument."""
    m = _DIGEST.fullmatch(digest or "")
    if not m:
        raise InvalidArgument(f"digest {clip_name(str(digest))!r} is not sha256:<64 lowercase hex digits>")
    return m.group(1)


def check_member(relpath: str) -> PurePosixPath:
    """A file name inside a model folder (``model.safetensors``, ``sub/x.json``), or InvalidArgument."""
    p = PurePosixPath(relpath or "")
    parts = p.parts
    if (
        not parts
        or p.is_absolute()
        or "\\" in relpath
        or len(parts) > _MAX_MEMBER_DEPTH
        or not all(_MEMBER_PART.fullmatch(x) and ".." not in x for x in parts)
    ):
        raise InvalidArgument(f"file name {clip_name(str(relpath))!r} is not allowed in a model folder")
    return p


class ModelStore:
    """The manifests and folders of managed models; safe to share between threads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._lock = threading.Lock()
        #: Held while a snapshot becomes a name's (``publish``) and while unused
        #: snapshots are collected, so a collection never takes a snapshot
        #: between its promotion and its first manifest.
        self._publish_lock = threading.RLock()
        self._db: Optional[sqlite3.Connection] = None

    # ---------------------------------------------------------------- paths

    def path_of(self, area: str, ident: str) -> Path:
        """THE name-to-path function: ``root/area/ident`` for a store-made id or a digest."""
        if area not in AREAS:
            raise ValueError(f"unknown store area {area!r}")
        if area == "blobs":
            ident = "sha256-" + digest_hex(ident)
        elif not _ID.fullmatch(ident or ""):
            raise ValueError(f"not a store id: {ident!r}")
        path = (self.root / area / ident).resolve()
        if path.parent != (self.root / area).resolve():
            raise ValueError(f"store path escapes its area: {ident!r}")
        return path

    def snapshot_path(self, snapshot: str) -> Path:
        return self.path_of("snapshots", snapshot)

    def partial_path(self, snapshot: str) -> Path:
        return self.path_of("partial", snapshot)

    def blob_path(self, digest: str) -> Path:
        return self.path_of("blobs", digest)

    @staticmethod
    def member_path(folder: Path, relpath: str) -> Path:
        """A file inside ``folder`` named by a hub listing or a caller; never outside it."""
        rel = check_member(relpath)
        path = folder.joinpath(*rel.parts)
        if folder.resolve() not in path.resolve().parents:
            raise InvalidArgument(f"file name {clip_name(relpath)!r} leaves the model folder")
        return path

    def promote(self, snapshot: str) -> Path:
        """Move a finished ``partial/<id>`` into ``snapshots/<id>`` in one rename.

        If that snapshot already exists (another pull finished the same commit
        first), the partial copy is dropped and the existing one kept.
        """
        src, dst = self.partial_path(snapshot), self.snapshot_path(snapshot)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            shutil.rmtree(src, ignore_errors=True)
            return dst
        os.replace(src, dst)
        return dst

    def publish(self, model: StoredModel) -> None:
        """Promote ``partial/<model.snapshot>`` unless that snapshot is already
        complete, then write ``model``'s manifest, as one step against collection."""
        with self._publish_lock:
            if not self.snapshot_path(model.snapshot).is_dir():
                self.promote(model.snapshot)
            self.put(model)

    # ---------------------------------------------------------------- manifests

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.root.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.root / "manifests.sqlite3", check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _has_db(self) -> bool:
        return self._db is not None or (self.root / "manifests.sqlite3").exists()

    @staticmethod
    def _row(row) -> StoredModel:
        name, snapshot, spec, created_at = row
        try:
            data = json.loads(spec)
        except ValueError:
            data = {}
        known = {k: v for k, v in data.items() if k in StoredModel.__dataclass_fields__}
        return StoredModel(name=name, snapshot=snapshot, created_at=created_at, **known)

    def get(self, name: str) -> Optional[StoredModel]:
        if not self._has_db():
            return None
        with self._lock:
            row = (
                self._conn()
                .execute("SELECT name, snapshot, spec, created_at FROM models WHERE key = ?", (store_key(name),))
                .fetchone()
            )
        return self._row(row) if row else None

    def all(self) -> list[StoredModel]:
        if not self._has_db():
            return []
        with self._lock:
            rows = self._conn().execute("SELECT name, snapshot, spec, created_at FROM models ORDER BY key").fetchall()
        return [self._row(r) for r in rows]

    def put(self, model: StoredModel) -> None:
        """Add or replace the manifest of ``model.name``; its snapshot must exist."""
        if not self.snapshot_path(model.snapshot).is_dir():
            raise ValueError(f"snapshot {model.snapshot} is not in the store")
        with self._lock:
            self._conn().execute(
                "INSERT OR REPLACE INTO models (key, name, snapshot, spec, created_at) VALUES (?, ?, ?, ?, ?)",
                (store_key(model.name), model.name, model.snapshot, json.dumps(model.spec()), model.created_at),
            )

    def remove(self, name: str) -> StoredModel:
        """Drop a name (ModelNotFound if absent), then the snapshots nothing refers to."""
        model = self.get(name)
        if model is None:
            raise ModelNotFound(f"model {clip_name(name)!r} not found")
        with self._lock:
            self._conn().execute("DELETE FROM models WHERE key = ?", (store_key(name),))
        self.collect_garbage()
        return model

    def referenced(self) -> set[str]:
        """Snapshot ids some name uses, as its model or as an adapter."""
        out: set[str] = set()
        for m in self.all():
            out.add(m.snapshot)
            out.update(a for a in m.adapters if isinstance(a, str))
        return out

    def collect_garbage(self, keep: Iterable[str] = ()) -> list[str]:
        """Remove snapshot folders no manifest names (and not in ``keep``)."""
        root = self.root / "snapshots"
        if not root.is_dir():
            return []
        removed = []
        with self._publish_lock:
            used = self.referenced() | set(keep)
            for sub in root.iterdir():
                if sub.name not in used and _ID.fullmatch(sub.name):
                    shutil.rmtree(sub, ignore_errors=True)
                    removed.append(sub.name)
        if removed:
            log.info("removed %d unused model snapshot(s) from %s", len(removed), root)
        return removed

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
