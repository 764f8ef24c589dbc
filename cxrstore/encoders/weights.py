"""Weights files: their sha256 (computed once, cached) and device / precision options.

Every real encoder records the sha256 of its weights in the store's provenance so
that vectors of two different weight files can never be mixed. Hashing a 2.5 GB file
takes seconds, so digests are cached in a small JSON file keyed by the file's
absolute path, size and modification time (nanoseconds): a changed file is hashed
again, an unchanged one never.

The cache lives in ``$CXRSTORE_CACHE`` when set, otherwise ``~/.cache/cxrstore``
(file ``weights-sha256.json``); it is rewritten atomically (temporary file, then
``os.replace``), and a cache that cannot be read or written is ignored with a
warning: the digest is then simply recomputed.

This module does not import torch at import time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from cxrstore.errors import UsageError

__all__ = [
    "FETCHABLE",
    "Device",
    "FetchSpec",
    "cache_dir",
    "check_device",
    "check_half",
    "fetch_plan",
    "fetch_weights",
    "file_sha256",
    "import_torch",
    "resolve_torch_device",
    "weights_sha256",
]

logger = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
DEVICES: tuple[str, ...] = ("cpu", "cuda")

_CACHE_FILE = "weights-sha256.json"
_CHUNK = 8 << 20


def cache_dir() -> Path:
    """The cxrstore cache folder: ``$CXRSTORE_CACHE`` or ``~/.cache/cxrstore``."""
    env = os.environ.get("CXRSTORE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cxrstore"


def _cache_path() -> Path:
    return cache_dir() / _CACHE_FILE


def _read_cache() -> dict[str, Any]:
    path = _cache_path()
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable weights hash cache %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(data: dict[str, Any]) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".weights-sha256.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        logger.warning("cannot write weights hash cache %s: %s", path, exc)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str], *, use_cache: bool = True) -> str:
    """sha256 of one file, cached by (absolute path, size, mtime_ns).

    Parameters
    ----------
    path : str or Path
        A regular file.
    use_cache : bool
        Read and update the cache (default); False always hashes.

    Raises
    ------
    UsageError
        If the file does not exist or is not a file.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UsageError(f"weights file {p} does not exist") from None
    if not p.is_file():
        raise UsageError(f"weights path {p} is not a file")
    if not use_cache:
        return _hash_file(p)
    sha, entry = _cached_or_hash(p, st, _read_cache())
    if entry is not None:
        cache = _read_cache()  # re-read: another process may have added entries meanwhile
        cache.update(entry)
        _write_cache(cache)
    return sha


def _cached_or_hash(p: Path, st: os.stat_result, cache: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(digest, new cache entry or None when the cache already had it)."""
    key = str(p.resolve())
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        sha = hit.get("sha256")
        if isinstance(sha, str) and len(sha) == 64:
            return sha, None
    logger.info("hashing %s (%d bytes)", p, st.st_size)
    sha = _hash_file(p)
    return sha, {key: {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}}


def weights_sha256(path: str | os.PathLike[str], *, use_cache: bool = True) -> str:
    """sha256 identifying a weights file or a weights folder.

    For a file: the sha256 of its bytes. For a folder: the sha256 of the text made of
    one line ``<relative path>\\t<sha256 of the file>\\n`` per file below it (all
    files, recursively, relative paths with ``/`` in sorted order; hidden files and
    folders, whose name starts with ``.``, are skipped). Each file's digest is cached
    by (path, size, mtime_ns), so an unchanged folder is not read again.

    Raises
    ------
    UsageError
        If the path does not exist, or is a folder without any file.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"weights path {p} does not exist")
    if p.is_file():
        return file_sha256(p, use_cache=use_cache)
    files = sorted(
        f.relative_to(p).as_posix()
        for f in p.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    if not files:
        raise UsageError(f"weights folder {p} holds no file")
    # one cache read and one write for the whole folder (it may hold many thousand files)
    cache = _read_cache() if use_cache else {}
    new: dict[str, Any] = {}
    h = hashlib.sha256()
    for rel in files:
        f = p / rel
        if use_cache:
            sha, entry = _cached_or_hash(f, f.stat(), cache)
            if entry:
                new.update(entry)
        else:
            sha = _hash_file(f)
        h.update(f"{rel}\t{sha}\n".encode())
    if new:
        cache = _read_cache()
        cache.update(new)
        _write_cache(cache)
    return h.hexdigest()


# -- device and precision ---------------------------------------------------------------
def check_device(device: str) -> str:
    """Validate a ``--device`` value (``cpu`` or ``cuda``, optionally ``cuda:N``)."""
    if not isinstance(device, str):
        raise UsageError(f"device must be a string, one of {', '.join(DEVICES)}; got {device!r}")
    base, _, index = device.partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise UsageError(f"unknown device {device!r}; choose one of: cpu, cuda (or cuda:N)")
    return device


def check_half(half: Any, device: str) -> bool:
    """Validate ``--half``: a bool; half precision is refused on the CPU."""
    if not isinstance(half, bool):
        raise UsageError(f"half must be True or False, not {half!r}")
    if half and check_device(device) == "cpu":
        raise UsageError("half precision (--half) needs --device cuda; on the CPU use float32 (drop --half)")
    return half


def import_torch(extra: str = "mii", encoder: str = "") -> Any:
    """Import torch, or raise a UsageError naming the extra that installs it."""
    try:
        import torch
    except ImportError:
        who = f"encoder {encoder!r} " if encoder else ""
        raise UsageError(
            f"{who}needs PyTorch, which is not installed; install the extra: pip install 'cxrstore[{extra}]'"
        ) from None
    return torch


def resolve_torch_device(device: str, *, extra: str = "mii", encoder: str = "") -> Any:
    """A ``torch.device`` for ``device``; ``cuda`` is refused when torch sees no GPU.

    Raises
    ------
    UsageError
        On an unknown device name, or ``cuda`` without a usable GPU (the message says
        what torch reports and how to fall back to ``--device cpu``).
    """
    torch = import_torch(extra, encoder)
    device = check_device(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = getattr(torch.version, "cuda", None)
            why = "this PyTorch build has no CUDA support" if not build else f"PyTorch (CUDA {build}) sees no GPU"
            raise UsageError(f"--device {device} requested but {why}; use --device cpu")
        idx = int(device.partition(":")[2] or 0)
        if idx >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device(device)


# -- optional download (never at run time) ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FetchSpec:
    """What ``cxrstore models fetch NAME`` downloads.

    Attributes
    ----------
    name : str
        Encoder name.
    repo_id : str
        Hugging Face model repository.
    patterns : tuple of str
        Files (or glob patterns) fetched, relative to the repository root.
    approx_bytes : int or None
        Approximate download size, when known.
    licence : str
        The weights' licence or terms.
    gated : bool
        The repository asks users to accept terms (and to log in) first.
    """

    name: str
    repo_id: str
    patterns: tuple[str, ...]
    approx_bytes: int | None
    licence: str
    gated: bool

    def describe(self) -> str:
        size = f"about {self.approx_bytes / 1e9:.2f} GB" if self.approx_bytes else "size unknown"
        gate = (
            "; gated: accept the terms on huggingface.co and log in (`hf auth login`) first" if self.gated else ""
        )
        return (
            f"{self.name}: from https://huggingface.co/{self.repo_id}, {len(self.patterns)} item(s) "
            f"({', '.join(self.patterns)}), {size}, licence: {self.licence}{gate}"
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FETCHABLE: dict[str, FetchSpec] = {
    "medimageinsight": FetchSpec(
        name="medimageinsight",
        repo_id="lion-ai/MedImageInsights",
        patterns=("2024.09.27/config.yaml", "2024.09.27/vision_model/medimageinsigt-v1.0.0.pt"),
        approx_bytes=2_460_000_000,
        licence="MIT",
        gated=False,
    ),
    "elixr-v2": FetchSpec(
        name="elixr-v2",
        repo_id="google/cxr-foundation",
        patterns=("elixr-c-v2-pooled/*", "pax-elixr-b-text/*"),
        approx_bytes=None,
        licence="Health AI Developer Foundations terms of use",
        gated=True,
    ),
    # for --encoder hf-vision
    "rad-dino": FetchSpec(
        name="rad-dino",
        repo_id="microsoft/rad-dino",
        patterns=("config.json", "preprocessor_config.json", "model.safetensors"),
        approx_bytes=None,
        licence="MSRLA / MIT (see the model card of the revision fetched)",
        gated=False,
    ),
    # for --encoder open-clip
    "biomedclip": FetchSpec(
        name="biomedclip",
        repo_id="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        patterns=("open_clip_config.json", "open_clip_pytorch_model.bin"),
        approx_bytes=None,
        licence="MIT",
        gated=False,
    ),
}


def fetch_plan(name: str) -> FetchSpec:
    """What fetching ``name`` would download; nothing is downloaded."""
    try:
        return FETCHABLE[name]
    except KeyError:
        raise UsageError(f"no download known for {name!r}; fetchable: {', '.join(sorted(FETCHABLE))}") from None


def fetch_weights(name: str, to: str | os.PathLike[str], *, downloader: Any = None) -> Path:
    """Download ``name``'s weights from Hugging Face into ``to`` (the layout the loader reads).

    Only called on an explicit request (``cxrstore models fetch``); encoders never
    download. ``downloader`` replaces ``huggingface_hub.snapshot_download`` (tests).

    Returns
    -------
    Path
        ``to``: pass it as the encoder's ``weights``.

    Raises
    ------
    UsageError
        Unknown name, or huggingface_hub not installed.
    """
    spec = fetch_plan(name)
    if downloader is None:
        try:
            from huggingface_hub import snapshot_download as downloader
        except ImportError:
            raise UsageError("downloading needs the huggingface_hub package: pip install huggingface_hub") from None
    dest = Path(to).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s", spec.describe())
    downloader(repo_id=spec.repo_id, allow_patterns=list(spec.patterns), local_dir=str(dest))
    return dest
