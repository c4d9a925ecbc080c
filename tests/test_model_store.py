"""The managed-model store: names are data, paths come from one function, a
name is a manifest row, folders go when no name uses them."""

from __future__ import annotations

import pytest

from backends.errors import InvalidArgument, ModelNotFound
from backends.mlx.registry import ModelRegistry
from backends.models.names import check_name
from backends.models.store import STORE_DIRNAME, ModelStore, StoredModel, check_member
from mlxgate.config import MLXConfig

GOOD = ["llama3.2", "llama3.2:1b", "hf.co/mlx-community/Qwen3-4B-4bit:main", "org/name", "_x.y-z:Q4_K_M"]
BAD = [
    "", "../x", "/etc/passwd", "a/../../b", "a\\b", "x:../../y", "a/b/c/d", ".hidden", "-x", "a b", "x\n",
    "a/./b", "a..b", "x" * 257, "x:", ":tag", "a//b", "C:\\models",
]


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass_untagged(name):
    assert check_name(name) == (name[: -len(":latest")] if name.endswith(":latest") else name)
    assert check_name("m:latest") == "m"


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_naming_the_field(name):
    with pytest.raises(InvalidArgument, match="destination"):
        check_name(name, "destination")


@pytest.mark.parametrize("member", ["../x", "/abs", "a/../b", ".git/config", "a\\b", "", "a/b/c/d/e", "x..y"])
def test_bad_member_names_are_refused(member):
    with pytest.raises(InvalidArgument):
        check_member(member)


def test_paths_never_leave_the_store(tmp_path):
    store = ModelStore(tmp_path / "s")
    assert store.snapshot_path("hf-abc").parent == (tmp_path / "s" / "snapshots").resolve()
    assert store.blob_path("sha256:" + "a" * 64).name == "sha256-" + "a" * 64
    for bad in ("../x", "x/../../y", "", "A", ".x", "x/y"):
        with pytest.raises(ValueError):
            store.snapshot_path(bad)
    with pytest.raises(InvalidArgument):
        store.blob_path("sha256:../../etc/passwd")
    folder = store.snapshot_path("hf-abc")
    assert store.member_path(folder, "sub/model.safetensors") == folder / "sub" / "model.safetensors"
    with pytest.raises(InvalidArgument):
        store.member_path(folder, "../../../etc/passwd")


def _snapshot(store: ModelStore, ident: str) -> None:
    part = store.partial_path(ident)
    part.mkdir(parents=True)
    (part / "config.json").write_text("{}")
    (part / "model.safetensors").write_bytes(b"x")
    store.promote(ident)


def test_copy_delete_and_garbage(tmp_path):
    store = ModelStore(tmp_path / "s")
    _snapshot(store, "snap-a")
    store.put(StoredModel("base", "snap-a", source={"repo": "o/r"}))
    store.put(StoredModel("Second:v1", "snap-a", system="be brief", parameters={"temperature": 0.2}))
    assert [m.name for m in store.all()] == ["base", "Second:v1"]
    assert store.get("second:V1").parameters == {"temperature": 0.2}
    assert store.get("base:latest").source == {"repo": "o/r"}
    store.remove("base")
    assert store.snapshot_path("snap-a").is_dir(), "a snapshot another name uses stays"
    store.remove("second:v1")
    assert not store.snapshot_path("snap-a").exists()
    with pytest.raises(ModelNotFound):
        store.remove("second:v1")
    with pytest.raises(ValueError):
        store.put(StoredModel("x", "never-made"))


def test_promote_keeps_the_first_complete_copy(tmp_path):
    store = ModelStore(tmp_path / "s")
    _snapshot(store, "snap-a")
    part = store.partial_path("snap-a")
    part.mkdir(parents=True)
    (part / "config.json").write_text('{"late": true}')
    store.promote("snap-a")
    assert (store.snapshot_path("snap-a") / "config.json").read_text() == "{}"
    assert not part.exists()


def test_manifests_survive_a_new_store_object(tmp_path):
    store = ModelStore(tmp_path / "s")
    _snapshot(store, "snap-a")
    store.put(StoredModel("kept", "snap-a", messages=[{"role": "user", "content": "hi"}]))
    store.close()
    again = ModelStore(tmp_path / "s")
    assert again.get("kept").messages == [{"role": "user", "content": "hi"}]


def test_the_registry_lists_managed_models_by_their_names(tmp_path):
    models = tmp_path / "models"
    (models / "hand-placed").mkdir(parents=True)
    (models / "hand-placed" / "config.json").write_text("{}")
    (models / "hand-placed" / "w.safetensors").write_bytes(b"x")
    store = ModelStore(models / STORE_DIRNAME)
    _snapshot(store, "snap-a")
    store.put(StoredModel("hf.co/org/Repo:main", "snap-a"))
    registry = ModelRegistry(MLXConfig(models_dir=str(models), hf_cache=str(tmp_path / "none")))
    names = [e.name for e in registry.scan()]
    assert names == ["hand-placed", "hf.co/org/Repo:main"]
    entry = registry.resolve("HF.co/org/repo:main")
    assert entry.source == "store" and entry.stored.snapshot == "snap-a"
    store.remove("hf.co/org/Repo:main")
    registry.forget()
    with pytest.raises(ModelNotFound):
        registry.resolve("hf.co/org/Repo:main")
