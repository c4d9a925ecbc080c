"""``pull``: a model from the Hugging Face Hub into the store, with Ollama's progress.

One pull, as a caller sees it (``Puller.pull``, an async generator of
``Progress``, the lines of Ollama's ``/api/pull`` stream):

1. before any output (so a failure is a plain status): the name is checked
   and resolved (``catalog``), the repo listed at the commit its revision
   points at (``hub``), access to its files checked (gated repos), and the
   free disk space compared with what is still to download;
2. ``pulling manifest``; then, for each LFS file (the weights), ``pulling
   <12 hex>`` with its sha256 as ``digest``, ``total`` and ``completed``: at
   most every ~100 ms while it downloads and once complete; small files
   (config, tokenizer) are fetched first, without lines of their own;
3. ``verifying sha256 digest`` (every file hashed and compared with the
   listing: a mismatch removes the file and fails the pull naming the file
   and both digests), ``writing manifest`` (the snapshot is renamed into
   place and the name written, ``ModelStore.publish``), ``removing unused
   layers`` when the name pointed at an older snapshot, ``success``.

The download itself is a ``_Download`` per snapshot (repo + commit), shared
by every pull that wants it: a second pull of the same model follows the
same download.  It writes into ``partial/<id>/``; when the last pull
following it goes away (client gone, cancelled), it is cancelled and its
files stay, so the next pull resumes them (HTTP Range).  A model whose
snapshot is complete downloads nothing.  At most ``max_concurrent_pulls``
downloads run at once; more wait.

Pulls are observed through ``PullObserver`` (``backends.metrics``): one
outcome and duration per pull, the bytes each download received.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator, Callable, Optional, Protocol

from backends.errors import BackendError, Unavailable
from backends.models.catalog import Catalog, Source
from backends.models.hub import HubClient, HubFile, RepoListing, StorageFull, expected_digest, file_digest
from backends.models.store import ModelStore, StoredModel
from mlxgate.config import HubConfig
from mlxgate.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

#: Seconds between two progress lines of one download (Ollama's pace).
PROGRESS_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Progress:
    """One line of a pull's progress (Ollama's ``ProgressResponse``)."""

    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0

    def to_pb(self) -> pb.PullModelResponse:
        return pb.PullModelResponse(status=self.status, digest=self.digest, total=self.total,
                                    completed=self.completed)


class PullObserver(Protocol):
    def pull_finished(self, outcome: str, seconds: float) -> None:
        """One pull ended: ``outcome`` is "success", "error" or "cancelled"."""

    def pull_received(self, n_bytes: int) -> None:
        """A download received ``n_bytes`` more from the hub."""


def snapshot_id(endpoint: str, repo: str, commit: str) -> str:
    """The store id of a repo's files at one commit (ids are store-made: ``[a-z0-9-]``)."""
    key = f"{endpoint.rstrip('/')}\n{repo.lower()}\n{commit}".encode()
    return f"hf-{commit[:12]}-{hashlib.sha256(key).hexdigest()[:24]}"


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Download:
    """One snapshot's download, followed by one or more pulls.

    Its lines live in ``lines`` (file lines are updated in place), so a
    follower reads the current state rather than a queue: a slow follower
    costs nothing, a late one sees everything so far."""

    def __init__(self, listing: RepoListing, snapshot: str) -> None:
        self.listing = listing
        self.snapshot = snapshot
        self.lines: list[Progress] = []
        self.error: Optional[BackendError] = None
        self.finished = False
        self.followers = 0
        self.task: Optional[asyncio.Task] = None
        self._changed = asyncio.Event()
        self._told = 0.0

    def add(self, line: Progress) -> int:
        self.lines.append(line)
        self.notify()
        return len(self.lines) - 1

    def update(self, index: int, completed: int, *, now: bool = False) -> None:
        self.lines[index] = replace(self.lines[index], completed=completed)
        if now or time.monotonic() - self._told >= PROGRESS_INTERVAL_S:
            self.notify()

    def notify(self) -> None:
        self._told = time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()

    def end(self, error: Optional[BackendError]) -> None:
        self.error, self.finished = error, True
        self.notify()

    async def follow(self) -> AsyncIterator[Progress]:
        """Every line, each file line again whenever it moved; raises the download's error."""
        sent: dict[int, Progress] = {}
        while True:
            changed = self._changed
            for i, line in enumerate(list(self.lines)):
                if sent.get(i) != line:
                    sent[i] = line
                    yield line
            if self.finished:
                if self.error is not None:
                    raise self.error
                return
            await changed.wait()


class Puller:
    """Pulls models into ``store`` from the hub; one per process."""

    def __init__(self, store: ModelStore, hub: HubClient, catalog: Catalog, config: HubConfig,
                 on_change: Callable[[], None] = lambda: None, observer: Optional[PullObserver] = None) -> None:
        """``on_change``: called after a name was written (the registry and
        the router's model lists forget what they cached)."""
        self.store = store
        self.hub = hub
        self.catalog = catalog
        self.config = config
        self.on_change = on_change
        self.observer = observer
        self._downloads: dict[str, _Download] = {}
        self._slots = asyncio.Semaphore(max(1, config.max_concurrent_pulls))

    async def pull(self, name: str) -> AsyncIterator[Progress]:
        """Ollama's progress lines for pulling ``name``; errors before the first
        line are raised before it (a plain status for the caller)."""
        started = time.monotonic()
        outcome = "error"
        download: Optional[_Download] = None
        try:
            source = self.catalog.resolve(name)
            listing = await self.hub.listing(source.repo, source.revision)
            snapshot = snapshot_id(self.hub.endpoint, listing.repo, listing.commit)
            download = await self._join(listing, snapshot)
            yield Progress("pulling manifest")
            if download is not None:
                async for line in download.follow():
                    yield line
            else:
                for f in listing.files:
                    if f.digest:
                        yield Progress(f"pulling {f.sha256[:12]}", f.digest, f.size, f.size)
                yield Progress("verifying sha256 digest")
            yield Progress("writing manifest")
            removed = await asyncio.to_thread(self._publish, source, listing, snapshot)
            self.on_change()
            if removed:
                yield Progress("removing unused layers")
            yield Progress("success")
            outcome = "success"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            if download is not None:
                self._leave(download)
            if self.observer is not None:
                self.observer.pull_finished(outcome, time.monotonic() - started)

    # ------------------------------------------------------------ steps

    async def _join(self, listing: RepoListing, snapshot: str) -> Optional[_Download]:
        """The download this pull follows (started if none runs), or None when
        the snapshot is complete already."""
        if self.store.snapshot_path(snapshot).is_dir():
            return None
        if snapshot not in self._downloads:
            await self.hub.check_access(listing)
        download = self._downloads.get(snapshot)
        if download is None:
            if self.store.snapshot_path(snapshot).is_dir():
                return None
            self._check_disk(listing, snapshot)
            download = self._start(listing, snapshot)
        download.followers += 1
        return download

    def _check_disk(self, listing: RepoListing, snapshot: str) -> None:
        partial = self.store.partial_path(snapshot)
        have = sum(min(_size(self.store.member_path(partial, f.path)), f.size) for f in listing.files)
        need = listing.total_bytes - have
        free = free_bytes(self.store.root)
        if need + self.config.reserve_bytes > free:
            raise StorageFull(
                f"not enough disk space for {listing.repo}: {_gb(need)} still to download, {_gb(free)} free "
                f"on {self.store.root} ({_gb(self.config.reserve_bytes)} kept free: hub.reserve_bytes)"
            )

    def _start(self, listing: RepoListing, snapshot: str) -> _Download:
        download = _Download(listing, snapshot)
        self._downloads[snapshot] = download
        download.task = asyncio.create_task(self._run(download), name=f"pull {listing.repo}")
        return download

    def _leave(self, download: _Download) -> None:
        download.followers -= 1
        if download.followers == 0 and not download.finished and download.task is not None:
            log.info("pull of %s cancelled by its last client; its files stay for the next pull",
                     download.listing.repo)
            download.task.cancel()

    async def _run(self, download: _Download) -> None:
        error: Optional[BackendError] = None
        try:
            async with self._slots:
                await self._download(download)
        except asyncio.CancelledError:
            error = Unavailable("pull cancelled")
        except BackendError as e:
            error = e
        except Exception:
            log.exception("pull of %s failed", download.listing.repo)
            error = Unavailable(f"pull of {download.listing.repo} failed (see the server log)")
        finally:
            self._downloads.pop(download.snapshot, None)
            download.end(error)

    async def _download(self, download: _Download) -> None:
        listing, store = download.listing, self.store
        partial = store.partial_path(download.snapshot)
        partial.mkdir(parents=True, exist_ok=True)
        paths = {f.path: store.member_path(partial, f.path) for f in listing.files}
        lines = {
            f.path: download.add(Progress(f"pulling {f.sha256[:12]}", f.digest, f.size,
                                          min(_size(paths[f.path]), f.size)))
            for f in listing.files if f.digest
        }
        for f in listing.files:
            dest = paths[f.path]
            dest.parent.mkdir(parents=True, exist_ok=True)
            line = lines.get(f.path)

            def received(n: int, f: HubFile = f, line: Optional[int] = line, dest: Path = dest) -> None:
                if self.observer is not None:
                    self.observer.pull_received(n)
                if line is not None:
                    download.update(line, min(_size(dest), f.size))

            await self.hub.fetch(listing, f, dest, received)
            if line is not None:
                download.update(line, f.size, now=True)
        download.add(Progress("verifying sha256 digest"))
        bad = await asyncio.to_thread(_verify, listing, paths)
        if bad is not None:
            f, got = bad
            raise Unavailable(
                f"{f.path} from {listing.repo}@{listing.commit[:12]} does not match the hub's listing: expected "
                f"{'sha256:' if f.sha256 else 'git blob '}{expected_digest(f)}, got {got}; the file was removed, "
                "pull again"
            )

    def _publish(self, source: Source, listing: RepoListing, snapshot: str) -> list[str]:
        """Write the name (promoting the snapshot if this pull is the first to
        finish it) and drop what the name no longer uses; returns what was removed."""
        before = self.store.get(source.name)
        self.store.publish(StoredModel(
            name=source.name, snapshot=snapshot,
            source={"repo": listing.repo, "revision": listing.revision, "commit": listing.commit,
                    "endpoint": self.hub.endpoint},
        ))
        if before is not None and before.snapshot != snapshot:
            return self.store.collect_garbage()
        return []

    async def close(self) -> None:
        tasks = [d.task for d in self._downloads.values() if d.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.hub.close()


def _verify(listing: RepoListing, paths: dict[str, Path]) -> Optional[tuple[HubFile, str]]:
    """The first file whose bytes do not match the listing (removed), with the digest found."""
    for f in listing.files:
        got = file_digest(paths[f.path], f)
        if got != expected_digest(f):
            paths[f.path].unlink(missing_ok=True)
            return f, (f"sha256:{got}" if f.sha256 else f"git blob {got}")
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
