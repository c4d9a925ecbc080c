"""A fake Hugging Face Hub: an aiohttp app on port 0 speaking the hub's HTTP API.

Replays what ``huggingface_hub`` reads (``hf_api.py``, ``file_download.py``,
``utils/_http.py``) and the hub documents:

* ``GET /api/models/{owner}/{repo}[/revision/{rev}]``: the repo's info, its
  commit in ``sha`` and its files in ``siblings`` (with ``blobs=true`` each
  file's ``size``, ``blobId`` and, for LFS files, ``lfs: {sha256, size,
  pointerSize}``);
* ``GET /api/models/{owner}/{repo}/tree/{rev}[/{path}]?recursive=true``: the
  tree listing, ``[{"type": "file", "oid", "size", "path", "lfs": {"oid",
  "size", "pointerSize"}}, {"type": "directory", ...}]``, in pages of
  ``page_size`` entries linked by a ``Link: <...>; rel="next"`` header;
* ``HEAD|GET /{owner}/{repo}/resolve/{rev}/{path}``: a small file's bytes
  (``ETag`` its git blob id, ``X-Repo-Commit``); an LFS file answers ``302``
  to the fake CDN (``/cdn/{sha256}`` on ``cdn_base``, another host name for
  this server) with ``X-Linked-Etag`` (its sha256),
  ``X-Linked-Size`` and ``X-Repo-Commit``, as the hub redirects to its CDN;
  both honour ``Range: bytes=N-`` / ``bytes=N-M`` with ``206`` and
  ``Content-Range``;
* errors: a missing repo is ``404`` with ``X-Error-Code: RepoNotFound``, a
  missing revision ``RevisionNotFound``, a missing file ``EntryNotFound``; a
  gated repo's info and tree are public, its files ``401`` without a token
  and ``403`` with one that was not granted, ``X-Error-Code: GatedRepo`` and
  the hub's reason in ``X-Error-Message``.

Faults, per file path (set them between requests): ``corrupt`` (one byte
flipped in what is served, the listing unchanged), ``slow`` (seconds between
16 KiB chunks: a download to cancel mid-way), ``drop`` (path -> (after_bytes,
times): the connection is cut after that many bytes, for that many requests).

It records every request in ``requests`` (method, path, Range header,
whether it carried a token) and counts the bytes of files it sent in
``sent_bytes``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aiohttp import web

#: Files stored with LFS (the hub's default .gitattributes: weights and anything large).
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
LFS_MIN_BYTES = 10 * 1024 * 1024
CHUNK = 16 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeFile:
    path: str
    data: bytes

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES) or len(self.data) >= LFS_MIN_BYTES

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        # An LFS file's git blob is its pointer file.
        if self.lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
            return git_blob_id(pointer.encode())
        return git_blob_id(self.data)


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, FakeFile]
    commit: str
    #: Branch or tag name -> commit (the commit itself always resolves).
    refs: dict[str, str] = field(default_factory=dict)
    #: Tokens allowed to read a gated repo's files; None: not gated.
    gated_tokens: Optional[set[str]] = None


@dataclass
class Request:
    method: str
    path: str
    range: str
    token: bool


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.corrupt: set[str] = set()
        self.slow: dict[str, float] = {}
        self.drop: dict[str, tuple[int, int]] = {}
        self.page_size = 1000
        self.requests: list[Request] = []
        self.sent_bytes = 0
        #: File bodies being sent now (a download the client stopped ends its stream).
        self.streaming = 0
        self.base = ""
        self.cdn_base = ""
        self._runner: Optional[web.AppRunner] = None

    # ------------------------------------------------------------ content

    def add_repo(self, repo_id: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",),
                 gated_tokens: Optional[set[str]] = None) -> FakeRepo:
        fake = {p: FakeFile(p, d) for p, d in files.items()}
        commit = hashlib.sha1(
            json.dumps({p: f.sha256 for p, f in sorted(fake.items())}).encode() + repo_id.encode()
        ).hexdigest()
        repo = FakeRepo(repo_id, fake, commit, {r: commit for r in refs}, gated_tokens)
        self.repos[repo_id.lower()] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, extra: Optional[dict[str, bytes]] = None, **kw) -> FakeRepo:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        files.update(extra or {})
        return self.add_repo(repo_id, files, **kw)

    # ------------------------------------------------------------ server

    async def start(self) -> "FakeHub":
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{repo}", self.info)
        app.router.add_get("/api/models/{owner}/{repo}/revision/{rev}", self.info)
        app.router.add_get("/api/models/{owner}/{repo}/tree/{rev}", self.tree)
        app.router.add_get("/api/models/{owner}/{repo}/tree/{rev}/{sub:.*}", self.tree)
        app.router.add_route("*", "/{owner}/{repo}/resolve/{rev}/{path:.*}", self.resolve)
        app.router.add_route("*", "/cdn/{sha256}", self.cdn)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        # Another host name for the same server: clients treat it as another
        # host (the hub's CDN), as they must (no token sent there).
        self.cdn_base = f"http://localhost:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------ handlers

    def _record(self, request: web.Request) -> None:
        self.requests.append(Request(request.method, request.path, request.headers.get("Range", ""),
                                     "Authorization" in request.headers))

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status,
                                 headers={"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, request: web.Request) -> tuple[Optional[FakeRepo], Optional[web.Response]]:
        repo_id = f"{request.match_info['owner']}/{request.match_info['repo']}"
        repo = self.repos.get(repo_id.lower())
        if repo is None:
            return None, self._error(404, "RepoNotFound", "Repository not found")
        return repo, None

    @staticmethod
    def _commit(repo: FakeRepo, rev: str) -> Optional[str]:
        return repo.commit if rev == repo.commit else repo.refs.get(rev)

    async def info(self, request: web.Request) -> web.Response:
        self._record(request)
        repo, err = self._repo(request)
        if err is not None:
            return err
        rev = request.match_info.get("rev", "main")
        if self._commit(repo, rev) is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for f in repo.files.values():
            s: dict = {"rfilename": f.path}
            if blobs:
                s.update(size=len(f.data), blobId=f.blob_id)
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
            siblings.append(s)
        return web.json_response({
            "_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
            "private": False, "gated": "manual" if repo.gated_tokens is not None else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": ["mlx"], "library_name": "mlx",
            "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
            "siblings": siblings,
        })

    async def tree(self, request: web.Request) -> web.Response:
        self._record(request)
        repo, err = self._repo(request)
        if err is not None:
            return err
        if self._commit(repo, request.match_info["rev"]) is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {request.match_info['rev']}")
        sub = request.match_info.get("sub", "").strip("/")
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for f in sorted(repo.files.values(), key=lambda f: f.path):
            rel = f.path[len(sub) + 1:] if sub else f.path
            if sub and not f.path.startswith(sub + "/"):
                continue
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = "/".join(([sub] if sub else []) + parts[:i])
                if recursive or i == 1:
                    entries.setdefault(d, {"type": "directory", "oid": git_blob_id(d.encode()), "size": 0, "path": d})
            if recursive or len(parts) == 1:
                e: dict = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": f.path}
                if f.lfs:
                    e["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                entries[f.path] = e
        items = list(entries.values())
        start = int(request.query.get("cursor", "0"))
        page = items[start:start + self.page_size]
        headers = {}
        if start + self.page_size < len(items):
            nxt = request.url.update_query(cursor=str(start + self.page_size))
            headers["Link"] = f'<{nxt}>; rel="next"'
        return web.Response(text=json.dumps(page), content_type="application/json", headers=headers)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        repo, err = self._repo(request)
        if err is not None:
            return err
        commit = self._commit(repo, request.match_info["rev"])
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {request.match_info['rev']}")
        f = repo.files.get(request.match_info["path"])
        if f is None:
            return self._error(404, "EntryNotFound", f"{request.match_info['path']} does not exist on \"{commit}\"")
        if repo.gated_tokens is not None:
            auth = request.headers.get("Authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
            if not token:
                return self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have "
                                   "access to it and be authenticated to access it. Please log in.")
            if token not in repo.gated_tokens:
                return self._error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are "
                                   "not in the authorized list. Visit https://huggingface.co/"
                                   f"{repo.repo_id} to ask for access.")
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data)),
                            "ETag": f'"{f.blob_id}"', "Location": f"{self.cdn_base}/cdn/{f.sha256}"})
            return web.Response(status=302, headers=headers)
        headers["ETag"] = f'"{f.blob_id}"'
        return await self._serve(request, f, headers)

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        for repo in self.repos.values():
            for f in repo.files.values():
                if f.lfs and f.sha256 == request.match_info["sha256"]:
                    return await self._serve(request, f, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"})
        return web.Response(status=404, text="NoSuchKey")

    async def _serve(self, request: web.Request, f: FakeFile, headers: dict[str, str]) -> web.StreamResponse:
        data = f.data
        if f.path in self.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, end = 0, len(data) - 1
        rng = request.headers.get("Range", "")
        status = 200
        if rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start = int(a)
            end = min(int(b), len(data) - 1) if b else len(data) - 1
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start:end + 1]
        headers["Content-Length"] = str(len(body))
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        cut_after: Optional[int] = None
        if f.path in self.drop:
            after, times = self.drop[f.path]
            if times > 0:
                self.drop[f.path] = (after, times - 1)
                cut_after = after
        delay = self.slow.get(f.path, 0.0)
        self.streaming += 1
        try:
            return await self._send(request, resp, body, cut_after, delay)
        finally:
            self.streaming -= 1

    async def _send(self, request: web.Request, resp: web.StreamResponse, body: bytes, cut_after: Optional[int],
                    delay: float) -> web.StreamResponse:
        sent = 0
        for i in range(0, len(body), CHUNK):
            piece = body[i:i + CHUNK]
            if cut_after is not None and sent + len(piece) > cut_after:
                piece = piece[: max(0, cut_after - sent)]
                if piece:
                    await resp.write(piece)
                    self.sent_bytes += len(piece)
                request.transport.close()  # the connection drops mid-file
                return resp
            await resp.write(piece)
            sent += len(piece)
            self.sent_bytes += len(piece)
            if delay:
                await asyncio.sleep(delay)
        await resp.write_eof()
        return resp
