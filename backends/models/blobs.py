"""Blobs: files uploaded with ``POST /api/blobs/sha256:<hex>`` for ``create``.

An upload is streamed to ``partial/upload-<random>`` while it is hashed, at
most ``MAX_BLOB_BYTES`` (and never past the free space of the disk less a
margin); only bytes whose SHA-256 is the digest named are renamed to
``blobs/sha256-<hex>``, anything else is removed and refused
(INVALID_ARGUMENT, Ollama's 400).  A blob already stored is kept and the
upload's bytes are read and dropped (Ollama answers 201 either way).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import AsyncIterator, Optional

from backends.errors import InvalidArgument, ResourceExhausted
from backends.models.store import ModelStore, digest_hex

#: Largest blob accepted (a single safetensors shard is far smaller).
MAX_BLOB_BYTES = 256 * 1024**3
#: Free space kept on the disk while writing.
DISK_MARGIN_BYTES = 1024**3


def blob_size(store: ModelStore, digest: str) -> Optional[int]:
    """The stored blob's size, or None when it is not there."""
    path = store.blob_path(digest)
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


class _Upload:
    """One upload in progress: a partial file, its hash and size."""

    def __init__(self, store: ModelStore, digest: str, max_bytes: int) -> None:
        self.store = store
        self.hex = digest_hex(digest)
        self.max_bytes = max_bytes
        self.path: Path = store.path_of("partial", f"upload-{secrets.token_hex(8)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self._free = shutil.disk_usage(self.path.parent).free - DISK_MARGIN_BYTES

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise InvalidArgument(f"blob larger than {self.max_bytes} bytes")
        if self.size > self._free:
            raise ResourceExhausted(f"not enough free disk space for the blob under {self.store.root}")
        self.hash.update(data)
        self.file.write(data)

    def finish(self) -> int:
        self.file.close()
        got = self.hash.hexdigest()
        if got != self.hex:
            raise InvalidArgument(f"digest mismatch: the bytes sent have sha256:{got}, not sha256:{self.hex}")
        dst = self.store.blob_path("sha256:" + self.hex)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, dst)
        return self.size

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


async def receive_blob(
    store: ModelStore, digest: str, chunks: AsyncIterator[bytes], max_bytes: int = MAX_BLOB_BYTES
) -> int:
    """Store the bytes of ``chunks`` as blob ``digest``; its size.  Writing
    and hashing run in a worker thread, a chunk at a time."""
    up = await asyncio.to_thread(_Upload, store, digest, max_bytes)
    done = False
    try:
        async for data in chunks:
            if data:
                await asyncio.to_thread(up.write, data)
        size = await asyncio.to_thread(up.finish)
        done = True
        return size
    except OSError as e:
        raise ResourceExhausted(f"cannot store the blob: {e.strerror or e}") from None
    finally:
        if not done:
            await asyncio.to_thread(up.discard)
