"""Pulling models from a Hugging Face Hub, against the local fake of the hub's
HTTP API (tests/fakes/hf_hub_fake.py), itself judged by ``huggingface_hub``'s
``snapshot_download``: Ollama's progress lines, every file checked, a model
listed only when complete, shared downloads, resume after a cancel or a cut,
errors before any output, the catalog."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import AsyncIterator

import pytest

from backends.errors import InvalidArgument, ModelNotFound, PermissionDenied, Unauthenticated, Unavailable
from backends.models.catalog import Catalog
from backends.models.hub import HubClient, StorageFull, is_model_file
from backends.models.pull import Progress, Puller
from backends.models.store import STORE_DIRNAME, ModelStore
from mlxgate.config import HubConfig
from mlxgate.config_load import load_config
from tests.fakes.hf_hub_fake import FakeHub
from tests.polling import eventually

WEIGHTS = "model.safetensors"
TOKEN = "hf_secret_token_for_tests"


@pytest.fixture
async def hub(test_model_dir: Path) -> AsyncIterator[FakeHub]:
    fake = await FakeHub().start()
    # Files pull must leave alone: a pickle, code, a README.
    fake.add_folder("org/tiny", test_model_dir / "tiny-llama",
                    extra={"pytorch_model.bin": b"\x80\x04pickle", "modeling_evil.py": b"import os", "README.md": b"#"},
                    refs=("main", "v1"))
    fake.add_folder("org/gated", test_model_dir / "tiny-llama", gated_tokens={TOKEN})
    fake.add_repo("org/gguf-only", {"config.json": b"{}", "model-Q4_K_M.gguf": b"GGUF" * 10})
    try:
        yield fake
    finally:
        await fake.stop()


def make_puller(tmp_path: Path, hub: FakeHub, **config) -> Puller:
    cfg = HubConfig(endpoint=hub.base, **config)
    store = ModelStore(tmp_path / "models" / STORE_DIRNAME)
    return Puller(store, HubClient(cfg), Catalog({"tiny": "org/tiny"}), cfg)


@pytest.fixture
async def puller(tmp_path: Path, hub: FakeHub) -> AsyncIterator[Puller]:
    p = make_puller(tmp_path, hub)
    try:
        yield p
    finally:
        await p.close()


async def pull_all(puller: Puller, name: str) -> list[Progress]:
    return [line async for line in puller.pull(name)]


def file_gets(hub: FakeHub) -> list:
    return [r for r in hub.requests if r.method == "GET" and ("/resolve/" in r.path or r.path.startswith("/cdn/"))]


def statuses(lines: list[Progress]) -> list[str]:
    return [p.status for p in lines if not p.digest]


# ---------------------------------------------------------------- the fake, judged by huggingface_hub


async def test_the_fake_hub_is_what_huggingface_hub_downloads_from(hub: FakeHub, tmp_path: Path,
                                                                   test_model_dir: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    hub.page_size = 3  # the tree listing comes in linked pages

    def download(repo: str, **kw) -> Path:
        return Path(snapshot_download(repo, endpoint=hub.base, cache_dir=str(tmp_path / "hf"), token=False, **kw))

    folder = await asyncio.to_thread(download, "org/tiny", revision="v1")
    for f in (test_model_dir / "tiny-llama").iterdir():
        assert (folder / f.name).read_bytes() == f.read_bytes(), f.name
    assert (folder / "pytorch_model.bin").read_bytes() == b"\x80\x04pickle"
    with pytest.raises(RepositoryNotFoundError):
        await asyncio.to_thread(download, "org/missing")
    with pytest.raises(RevisionNotFoundError):
        await asyncio.to_thread(download, "org/tiny", revision="nope")
    with pytest.raises(GatedRepoError):
        await asyncio.to_thread(download, "org/gated")


# ---------------------------------------------------------------- pulling


async def test_a_pull_streams_ollamas_progress_and_lists_the_model_when_complete(
        puller: Puller, hub: FakeHub, test_model_dir: Path) -> None:
    lines = await pull_all(puller, "hf.co/org/tiny")
    size = (test_model_dir / "tiny-llama" / WEIGHTS).stat().st_size
    weights = hub.repos["org/tiny"].files[WEIGHTS]
    assert lines[0] == Progress("pulling manifest")
    assert statuses(lines)[1:] == ["verifying sha256 digest", "writing manifest", "success"]
    files = [p for p in lines if p.digest]
    assert files and {p.digest for p in files} == {f"sha256:{weights.sha256}"}
    assert all(p.status == f"pulling {weights.sha256[:12]}" and p.total == size for p in files)
    assert files[-1].completed == size and [p.completed for p in files] == sorted(p.completed for p in files)
    # Listed under the name pulled, pointing at a complete snapshot; nothing left half-done.
    model = puller.store.get("hf.co/org/tiny")
    assert model is not None and model.source["repo"] == "org/tiny"
    assert model.source["commit"] == hub.repos["org/tiny"].commit
    folder = puller.store.snapshot_path(model.snapshot)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (test_model_dir / "tiny-llama").iterdir())
    assert (folder / WEIGHTS).read_bytes() == (test_model_dir / "tiny-llama" / WEIGHTS).read_bytes()
    assert not puller.store.partial_path(model.snapshot).exists()
    # Only model files were fetched: no pickle, no code, no README.
    fetched = {r.path for r in hub.requests if "/resolve/" in r.path}
    assert not any(p.endswith(("pytorch_model.bin", "modeling_evil.py", "README.md")) for p in fetched)


async def test_a_model_already_present_downloads_nothing(puller: Puller, hub: FakeHub) -> None:
    await pull_all(puller, "org/tiny")
    before = len(file_gets(hub))
    lines = await pull_all(puller, "tiny")  # the catalog's name for the same repo
    assert len(file_gets(hub)) == before
    assert statuses(lines) == ["pulling manifest", "verifying sha256 digest", "writing manifest", "success"]
    assert [p.completed == p.total for p in lines if p.digest] == [True]
    assert {m.name for m in puller.store.all()} == {"org/tiny", "tiny"}
    assert len({m.snapshot for m in puller.store.all()}) == 1


async def test_a_corrupted_file_fails_the_pull_naming_it_and_nothing_is_listed(puller: Puller, hub: FakeHub) -> None:
    hub.corrupt.add(WEIGHTS)
    lines: list[Progress] = []
    with pytest.raises(Unavailable) as e:
        async for line in puller.pull("org/tiny"):
            lines.append(line)
    sha = hub.repos["org/tiny"].files[WEIGHTS].sha256
    assert WEIGHTS in e.value.message and f"sha256:{sha}" in e.value.message and "got sha256:" in e.value.message
    assert statuses(lines)[-1] == "verifying sha256 digest"
    assert puller.store.get("org/tiny") is None
    assert not (puller.store.root / "snapshots").exists() or not any((puller.store.root / "snapshots").iterdir())
    assert not list(puller.store.root.glob(f"partial/*/{WEIGHTS}")), "the bad bytes are removed"
    hub.corrupt.clear()
    assert (await pull_all(puller, "org/tiny"))[-1].status == "success"


async def _until_some_bytes(lines: AsyncIterator[Progress]) -> Progress:
    async for line in lines:
        if line.digest and 0 < line.completed < line.total:
            return line
    raise AssertionError("the download ended before any progress")


async def test_a_cancelled_pull_keeps_its_bytes_and_the_next_pull_resumes(puller: Puller, hub: FakeHub) -> None:
    hub.slow[WEIGHTS] = 0.05
    lines = puller.pull("org/tiny")
    seen = await _until_some_bytes(lines)
    await lines.aclose()  # the client went away
    # The download stops once its last follower left.
    await eventually(lambda: not puller._downloads, what="the download stopping")
    partial = next(puller.store.root.glob(f"partial/*/{WEIGHTS}"))
    kept = partial.stat().st_size
    assert seen.completed <= kept < seen.total
    assert puller.store.get("org/tiny") is None
    hub.slow.clear()
    done = await pull_all(puller, "org/tiny")
    assert done[-1].status == "success"
    resumed = [r for r in file_gets(hub) if r.path.startswith("/cdn/")][-1]
    assert resumed.range == f"bytes={kept}-"
    first = [p for p in done if p.digest][0]
    assert first.completed == kept, "progress starts from the bytes already there"


async def test_a_connection_cut_mid_file_is_resumed_with_range(puller: Puller, hub: FakeHub) -> None:
    hub.drop[WEIGHTS] = (100_000, 1)
    assert (await pull_all(puller, "org/tiny"))[-1].status == "success"
    ranges = [r.range for r in file_gets(hub) if r.path.startswith("/cdn/")]
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) >= 100_000 - 16 * 1024


async def test_a_pull_cut_every_time_fails_and_the_next_one_resumes(puller: Puller, hub: FakeHub) -> None:
    hub.drop[WEIGHTS] = (50_000, 99)
    with pytest.raises(Unavailable, match="pull again to resume"):
        await pull_all(puller, "org/tiny")
    kept = next(puller.store.root.glob(f"partial/*/{WEIGHTS}")).stat().st_size
    assert kept > 0
    hub.drop.clear()
    assert (await pull_all(puller, "org/tiny"))[-1].status == "success"
    assert [r.range for r in file_gets(hub) if r.path.startswith("/cdn/")][-1] == f"bytes={kept}-"


async def test_two_concurrent_pulls_share_one_download(puller: Puller, hub: FakeHub) -> None:
    hub.slow[WEIGHTS] = 0.01
    first = puller.pull("org/tiny")
    await _until_some_bytes(first)

    async def rest(lines: AsyncIterator[Progress]) -> list[Progress]:
        return [line async for line in lines]

    a, b = await asyncio.gather(rest(first), pull_all(puller, "hf.co/org/tiny"))
    assert a[-1].status == b[-1].status == "success"
    assert b[0].status == "pulling manifest" and any(p.digest for p in b)
    assert len([r for r in file_gets(hub) if r.path.startswith("/cdn/")]) == 1, "one download of the weights"
    assert {m.name for m in puller.store.all()} == {"org/tiny", "hf.co/org/tiny"}


async def test_one_of_two_followers_leaving_does_not_stop_the_download(puller: Puller, hub: FakeHub) -> None:
    hub.slow[WEIGHTS] = 0.01
    leaving = puller.pull("org/tiny")
    await _until_some_bytes(leaving)
    staying = asyncio.ensure_future(pull_all(puller, "tiny"))
    await eventually(lambda: sum(d.followers for d in puller._downloads.values()) >= 2, what="two followers")
    await leaving.aclose()
    assert (await staying)[-1].status == "success"
    assert len([r for r in file_gets(hub) if r.path.startswith("/cdn/")]) == 1


# ---------------------------------------------------------------- errors before any output


async def _first(puller: Puller, name: str) -> Progress:
    lines = puller.pull(name)
    try:
        return await lines.__anext__()
    finally:
        await lines.aclose()


@pytest.mark.parametrize("name, error, words", [
    ("org/missing", ModelNotFound, "not found"),
    ("hf.co/org/tiny:nope", ModelNotFound, "no revision 'nope'"),
    ("no-such-library-model", ModelNotFound, "catalog"),
    ("org/gated", Unauthenticated, "restricted"),
    ("org/gguf-only", InvalidArgument, "not an MLX model"),
    ("../../etc/passwd", InvalidArgument, "not a valid model name"),
    ("x" * 257, InvalidArgument, "longer than 256"),
    ("registry.ollama.ai/library/llama3", InvalidArgument, "only Hugging Face repos"),
])
async def test_errors_come_before_any_output(puller: Puller, hub: FakeHub, name: str, error: type,
                                             words: str) -> None:
    with pytest.raises(error, match=words):
        await _first(puller, name)
    assert not file_gets(hub)
    assert not puller.store.all()


async def test_gated_repos_need_a_token_with_access(tmp_path: Path, hub: FakeHub, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = make_puller(tmp_path / "a", hub, token="hf_not_granted")
    with pytest.raises(PermissionDenied, match="not in the authorized list"):
        await _first(wrong, "org/gated")
    await wrong.close()
    right = make_puller(tmp_path / "b", hub, token=TOKEN)
    assert (await pull_all(right, "org/gated"))[-1].status == "success"
    await right.close()
    assert all(r.token for r in hub.requests if "/resolve/" in r.path)
    assert not any(r.token for r in hub.requests if r.path.startswith("/cdn/")), "the token stays on the hub"
    assert TOKEN not in caplog.text and TOKEN not in repr(right.config)


async def test_a_repo_that_does_not_fit_on_disk_is_refused_before_downloading(tmp_path: Path, hub: FakeHub) -> None:
    p = make_puller(tmp_path, hub, reserve_bytes=1 << 60)
    with pytest.raises(StorageFull, match="not enough disk space"):
        await _first(p, "org/tiny")
    await p.close()
    small = make_puller(tmp_path / "c", hub, max_repo_bytes=1000)
    with pytest.raises(StorageFull, match="max_repo_bytes"):
        await _first(small, "org/tiny")
    await small.close()
    assert not file_gets(hub)


async def test_an_unreachable_hub_is_unavailable(tmp_path: Path) -> None:
    cfg = HubConfig(endpoint="http://127.0.0.1:9", connect_timeout=2, idle_timeout=2)
    p = Puller(ModelStore(tmp_path / "s"), HubClient(cfg), Catalog({}), cfg)
    with pytest.raises(Unavailable, match="unreachable"):
        await _first(p, "org/tiny")
    await p.close()


# ---------------------------------------------------------------- names, files, configuration


def test_the_catalog_maps_ollama_names_to_mlx_repos() -> None:
    c = Catalog({"llama3.2:1b": "me/my-llama:dev"})
    assert (c.resolve("llama3.2").repo, c.resolve("llama3.2").revision) == \
        ("mlx-community/Llama-3.2-3B-Instruct-4bit", "main")
    assert c.resolve("llama3.2:latest").name == "llama3.2"
    assert c.resolve("qwen3:4b").repo == "mlx-community/Qwen3-4B-4bit"
    assert c.resolve("gemma3:4b").repo == "mlx-community/gemma-3-4b-it-4bit"
    assert c.resolve("mistral").repo == "mlx-community/Mistral-7B-Instruct-v0.3-4bit"
    assert (c.resolve("llama3.2:1b").repo, c.resolve("llama3.2:1b").revision) == ("me/my-llama", "dev")
    s = c.resolve("hf.co/mlx-community/Qwen3-8B-4bit:abc123")
    assert (s.name, s.repo, s.revision) == ("hf.co/mlx-community/Qwen3-8B-4bit:abc123", "mlx-community/Qwen3-8B-4bit",
                                            "abc123")
    assert c.resolve("huggingface.co/a/b:latest").revision == "main"
    with pytest.raises(ValueError, match="not a Hugging Face repo id"):
        Catalog({"x": "no-owner"})
    with pytest.raises(ValueError, match="not a valid model name"):
        Catalog({"../x": "a/b"})


@pytest.mark.parametrize("path, fetched", [
    ("config.json", True), ("model-00001-of-00002.safetensors", True), ("model.safetensors.index.json", True),
    ("tokenizer.json", True), ("tokenizer.model", True), ("chat_template.jinja", True),
    ("generation_config.json", True), ("preprocessor_config.json", True), ("1_Pooling/config.json", True),
    ("pytorch_model.bin", False), ("model.pt", False), ("modeling_x.py", False), ("x.pkl", False),
    ("README.md", False), (".gitattributes", False), ("sub/model.safetensors", False), ("model.gguf", False),
])
def test_only_model_files_are_fetched(path: str, fetched: bool) -> None:
    assert is_model_file(path) is fetched


def test_hub_settings_and_catalog_come_from_env_and_toml(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[hub]\nmax_concurrent_pulls = 3\n[catalog]\n"phi4:mini" = "mlx-community/Phi-4-mini-4bit"\n')
    cfg = load_config(toml, env={"HF_ENDPOINT": "http://mirror.lan:8080/", "HF_TOKEN": TOKEN})
    assert cfg.hub.endpoint == "http://mirror.lan:8080/" and cfg.hub.token == TOKEN
    assert cfg.hub.max_concurrent_pulls == 3
    assert cfg.catalog == {"phi4:mini": "mlx-community/Phi-4-mini-4bit"}
    assert TOKEN not in repr(cfg)
    assert Catalog(cfg.catalog).resolve("phi4:mini").repo == "mlx-community/Phi-4-mini-4bit"
    bad = tmp_path / "bad.toml"
    bad.write_text('[catalog]\n"x" = 3\n')
    with pytest.raises(ValueError, match="catalog"):
        load_config(bad, env={})
