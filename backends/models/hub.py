"""A Hugging Face Hub client for ``pull``: list a repo, fetch its files, check them.

The listing goes through ``huggingface_hub`` (``model_info`` for the commit a
revision points at, then ``list_repo_tree`` at that commit: every file's
size, git blob id and, for LFS files, the sha256), in a thread pool of its
own and under a deadline, since its tree listing takes no timeout.  Files
come from the hub's ``resolve`` URL with aiohttp: a callback per chunk
(progress), ``Range`` to go on from the bytes already on disk, connect and
idle timeouts.  Then every file is checked (``file_digest``): LFS files
against the sha256 the listing gave (``huggingface_hub`` does not check it),
the others against their git blob id.

Only model files are listed (``is_model_file``): config, safetensors and
their index, tokenizer and chat-template files, generation and processor
configs.  Nothing that could hold code or pickles (``*.bin``, ``*.pt``,
``*.py``, ``*.pkl``) is ever fetched, and nothing fetched is executed.

The token (``HubConfig.token``, HF_TOKEN) goes to the hub's own host only
(aiohttp drops it on a redirect elsewhere, e.g. the CDN), and is never logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional
from urllib.parse import quote

import aiohttp
import grpc

from backends.errors import BackendError, InvalidArgument, ModelNotFound, PermissionDenied, Unauthenticated, Unavailable
from mlxgate.config import HubConfig
from mlxgate.limits import clip

log = logging.getLogger(__name__)

#: Files fetched: exact names, and patterns on the last part of the path.
MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    # sentence-transformers layouts (embedding models)
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
})
_WEIGHTS = re.compile(r"[^/]+\.safetensors(\.index\.json)?")
#: sentence-transformers' pooling settings, the one sub-folder fetched.
_POOLING = re.compile(r"\d+_Pooling/config\.json")
_CHUNK = 1 << 20
#: A download's bytes reach the disk (and its progress) at least this often.
FLUSH_INTERVAL_S = 0.1
#: Attempts per file when the connection drops mid-way (each goes on from where the last stopped).
ATTEMPTS = 3


def is_model_file(path: str) -> bool:
    """Whether a repo file is one ``pull`` fetches (top level, or a pooling config)."""
    if "/" not in path:
        return path in MODEL_FILES or bool(_WEIGHTS.fullmatch(path))
    return bool(_POOLING.fullmatch(path))


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    #: The git blob id (sha1 of "blob <size>\\0" + bytes).
    blob_id: str
    #: The LFS object's sha256 (hex), for LFS files; "" otherwise.
    sha256: str = ""

    @property
    def digest(self) -> str:
        """Ollama's form of the file's id: ``sha256:<hex>`` (LFS files), else ``""``."""
        return f"sha256:{self.sha256}" if self.sha256 else ""


@dataclass(frozen=True)
class RepoListing:
    repo: str
    revision: str
    commit: str
    files: tuple[HubFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class StorageFull(BackendError):
    """A repo too large for the caps or the disk (FAILED_PRECONDITION: 400, the caller's to fix)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def file_digest(path: Path, f: HubFile) -> str:
    """What the hub lists for ``f``, computed from the bytes at ``path``: the
    sha256 of an LFS file, the git blob id of the others (runs in a thread)."""
    h = hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * _CHUNK):
            h.update(chunk)
    return h.hexdigest()


def expected_digest(f: HubFile) -> str:
    return f.sha256 or f.blob_id


class HubClient:
    """One per process; ``close()`` ends its HTTP session and listing threads."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.endpoint = config.endpoint.rstrip("/")
        self._session: Optional[aiohttp.ClientSession] = None
        self._listing_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="hub-listing")

    # ---------------------------------------------------------------- listing

    def _api(self):
        from huggingface_hub import HfApi

        # token=False: only the configured token, never one found in the environment or on disk.
        return HfApi(endpoint=self.endpoint, token=self.config.token or False, library_name="mlxgate")

    def _list(self, repo: str, revision: str) -> RepoListing:
        from huggingface_hub import RepoFile

        api = self._api()
        timeout = self.config.connect_timeout + self.config.idle_timeout
        with _hub_errors(repo, revision, self.endpoint):
            info = api.model_info(repo, revision=revision, timeout=timeout)
            commit = info.sha or ""
            if not re.fullmatch(r"[0-9a-f]{40}", commit):
                raise Unavailable(f"{self.endpoint} gave no commit for {repo}@{revision}")
            files = []
            for n, entry in enumerate(api.list_repo_tree(repo, revision=commit, recursive=True)):
                if n >= self.config.max_files:
                    raise StorageFull(f"{repo} has more than {self.config.max_files} files (hub.max_files)")
                if isinstance(entry, RepoFile) and is_model_file(entry.path):
                    files.append(HubFile(entry.path, int(entry.size), entry.blob_id,
                                         entry.lfs.sha256 if entry.lfs is not None else ""))
        listing = RepoListing(repo, revision, commit, tuple(sorted(files, key=lambda f: (bool(f.sha256), f.path))))
        names = {PurePosixPath(f.path).name for f in files}
        if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
            raise InvalidArgument(
                f"{repo}@{revision} is not an MLX model: it has no config.json and *.safetensors weights "
                "(GGUF repos are for llama.cpp and Ollama; look for an MLX conversion, e.g. under mlx-community/)"
            )
        if listing.total_bytes > self.config.max_repo_bytes:
            raise StorageFull(f"{repo}@{revision} is {listing.total_bytes} bytes, above hub.max_repo_bytes "
                              f"({self.config.max_repo_bytes})")
        return listing

    async def listing(self, repo: str, revision: str) -> RepoListing:
        """The repo's model files at the commit ``revision`` points at.

        Errors: ModelNotFound (repo or revision), Unauthenticated / PermissionDenied
        (private or gated, with the hub's reason), InvalidArgument (not an
        MLX model), StorageFull (over the caps), Unavailable (hub down or slow)."""
        loop = asyncio.get_running_loop()
        # Pages of 1,000 entries, each within the idle timeout, a few retries: a generous bound.
        deadline = (self.config.connect_timeout + self.config.idle_timeout) * 4
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._listing_pool, self._list, repo, revision),
                                          deadline)
        except asyncio.TimeoutError:
            raise Unavailable(f"listing {repo}@{revision} on {self.endpoint} took over {deadline:.0f} s") from None

    # ---------------------------------------------------------------- files

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout,
                                              sock_read=self.config.idle_timeout),
                headers={"User-Agent": "mlxgate"},
            )
        return self._session

    def resolve_url(self, repo: str, commit: str, path: str) -> str:
        return f"{self.endpoint}/{repo}/resolve/{commit}/{quote(path)}"

    def _headers(self, extra: Optional[dict] = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        return headers

    async def check_access(self, listing: RepoListing) -> None:
        """A gated or private repo's files need a token with access: find out
        before any download (the listing itself is public for gated repos)."""
        f = next(f for f in listing.files if f.path == "config.json")
        url = self.resolve_url(listing.repo, listing.commit, f.path)
        try:
            async with self._http().head(url, headers=self._headers(), allow_redirects=False) as r:
                if r.status >= 400:
                    raise _status_error(r, listing.repo, listing.revision)
        except aiohttp.ClientError as e:
            raise Unavailable(f"{self.endpoint} is unreachable: {clip(str(e) or type(e).__name__, 200)}") from None
        except asyncio.TimeoutError:
            raise Unavailable(f"{self.endpoint} did not answer in time") from None

    async def fetch(self, listing: RepoListing, f: HubFile, dest: Path, received: Callable[[int], None]) -> None:
        """Bring ``dest`` to ``f``'s full size, going on from what it holds;
        ``received(n)`` after each chunk written.  A dropped connection is
        retried (from where it stopped) up to ``ATTEMPTS`` times."""
        url = self.resolve_url(listing.repo, listing.commit, f.path)
        for attempt in range(1, ATTEMPTS + 1):
            have = dest.stat().st_size if dest.exists() else 0
            if have > f.size:
                dest.unlink()
                have = 0
            if have == f.size:
                if f.size == 0:
                    dest.touch()
                return
            try:
                await self._get(url, listing, dest, have, received)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                if attempt == ATTEMPTS:
                    raise Unavailable(
                        f"downloading {f.path} from {self.endpoint} failed {ATTEMPTS} times "
                        f"({clip(str(e) or type(e).__name__, 200)}); pull again to resume"
                    ) from None
                log.info("%s: %s (attempt %d), resuming", f.path, type(e).__name__, attempt)
                await asyncio.sleep(0.5 * attempt)
        have = dest.stat().st_size if dest.exists() else 0
        if have != f.size:
            raise Unavailable(f"{f.path}: the hub sent {have} bytes, its listing says {f.size}")

    async def _get(self, url: str, listing: RepoListing, dest: Path, have: int,
                   received: Callable[[int], None]) -> None:
        headers = self._headers({"Range": f"bytes={have}-"} if have else None)
        async with self._http().get(url, headers=headers) as r:
            if r.status == 200:
                have = 0  # no Range honoured: start over
            elif r.status == 206:
                start = _range_start(r.headers.get("Content-Range", ""))
                if start != have:
                    raise Unavailable(f"{url}: asked for bytes from {have}, got a range from {start}")
            else:
                raise _status_error(r, listing.repo, listing.revision)
            with open(dest, "r+b" if have else "wb") as fh:
                fh.seek(have)
                fh.truncate()
                buf = bytearray()
                flushed = time.monotonic()
                try:
                    async for chunk in r.content.iter_any():
                        buf += chunk
                        if len(buf) >= _CHUNK or time.monotonic() - flushed >= FLUSH_INTERVAL_S:
                            data = bytes(buf)
                            buf.clear()
                            await _write(fh, data)
                            received(len(data))
                            flushed = time.monotonic()
                finally:
                    # Cancelled or cut: what arrived is kept for the next attempt.
                    if buf:
                        fh.write(buf)
                        received(len(buf))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._listing_pool.shutdown(wait=False, cancel_futures=True)


async def _write(fh, data: bytes) -> None:
    """Write in a thread (a disk busy with a large download must not stall
    the event loop); if cancelled meanwhile, the write still completes before
    the cancellation goes on, so the file is never closed under it."""
    done = asyncio.ensure_future(asyncio.to_thread(fh.write, data))
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await done
        raise


def _range_start(content_range: str) -> int:
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    return int(m.group(1)) if m else -1


def _status_error(r: aiohttp.ClientResponse, repo: str, revision: str) -> BackendError:
    """A hub answer's status as the error a caller sees (the hub's reason kept)."""
    code = r.headers.get("X-Error-Code", "")
    reason = clip(r.headers.get("X-Error-Message", "") or r.reason or "", 300)
    if code == "GatedRepo" or r.status in (401, 403):
        what = f"{repo} is gated or private" if code == "GatedRepo" or r.status == 401 else f"access to {repo} denied"
        message = f"{what}: {reason} (HF_TOKEN must be a token with access to it)"
        return Unauthenticated(message) if r.status == 401 else PermissionDenied(message)
    if r.status == 404:
        return ModelNotFound(f"not found: {repo}@{revision} ({reason or code or 'no such file'})")
    return Unavailable(f"the hub answered {r.status} for {repo}@{revision}: {reason}")


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str, endpoint: str):
    """``huggingface_hub``'s exceptions as the errors callers see."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except BackendError:
        raise
    except GatedRepoError as e:
        status = e.response.status_code if e.response is not None else 403
        reason = clip(e.server_message or "gated repo", 300)
        message = f"{repo} is gated: {reason} (HF_TOKEN must be a token with access to it)"
        raise (Unauthenticated(message) if status == 401 else PermissionDenied(message)) from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"not found: {repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"not found: no model repo {repo} on {endpoint} (if it is private, set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if status == 403:
            raise PermissionDenied(f"{repo}: {clip(e.server_message or 'forbidden', 300)}") from None
        raise Unavailable(f"the hub answered {status} for {repo}@{revision}") from None
    except Exception as e:  # connection refused, timeouts, offline mode
        log.info("listing %s@%s failed: %r", repo, revision, e)
        raise Unavailable(f"{endpoint} is unreachable ({type(e).__name__})") from None
