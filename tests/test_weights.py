"""Weights sha256 (cached by path, size and mtime) and the device / precision options."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from cxrstore.encoders import weights as w
from cxrstore.errors import UsageError


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXRSTORE_CACHE", str(cache))
    return cache


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = w._hash_file

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(w, "_hash_file", counting)
    return calls


def test_file_sha_is_cached_by_size_and_mtime(tmp_path: Path, _cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"abc" * 1000)
    calls = _count_hashes(monkeypatch)
    assert w.weights_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert w.weights_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert len(calls) == 1  # second call served from the cache
    cache = json.loads((_cache / "weights-sha256.json").read_text())
    entry = cache[str(f.resolve())]
    assert entry["size"] == 3000 and entry["sha256"] == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert not [p for p in _cache.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind
    # same size, new content and mtime: hashed again
    f.write_bytes(b"abd" * 1000)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert w.weights_sha256(f) == hashlib.sha256(b"abd" * 1000).hexdigest()
    assert len(calls) == 2


def test_stale_entry_with_same_mtime_but_other_size_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 10)
    w.weights_sha256(f)
    st = f.stat()
    f.write_bytes(b"y" * 11)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.weights_sha256(f) == hashlib.sha256(b"y" * 11).hexdigest()


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path, _cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    _cache.mkdir()
    (_cache / "weights-sha256.json").write_text("{not json")
    f = tmp_path / "w.bin"
    f.write_bytes(b"hello")
    assert w.weights_sha256(f) == hashlib.sha256(b"hello").hexdigest()
    assert "ignoring unreadable weights hash cache" in caplog.text
    assert str(f.resolve()) in json.loads((_cache / "weights-sha256.json").read_text())


def test_folder_sha_covers_every_file_by_relative_path(tmp_path: Path) -> None:
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "config.yaml").write_text("x: 1\n")
    (a / "sub" / "weights.pt").write_bytes(b"\x00\x01")
    (a / ".hidden").write_text("ignored")
    b = tmp_path / "b"
    (b / "sub").mkdir(parents=True)
    (b / "sub" / "weights.pt").write_bytes(b"\x00\x01")  # created in the other order
    (b / "config.yaml").write_text("x: 1\n")
    expected = hashlib.sha256(
        f"config.yaml\t{hashlib.sha256(b'x: 1' + bytes([10])).hexdigest()}\n"
        f"sub/weights.pt\t{hashlib.sha256(bytes([0, 1])).hexdigest()}\n".encode()
    ).hexdigest()
    assert w.weights_sha256(a) == w.weights_sha256(b) == expected
    (b / "sub" / "weights.pt").write_bytes(b"\x00\x02")
    assert w.weights_sha256(b) != expected
    (b / "sub" / "weights.pt").rename(b / "sub" / "other.pt")
    (b / "sub" / "other.pt").write_bytes(b"\x00\x01")
    assert w.weights_sha256(b) != expected  # same bytes under another name: another folder


def test_missing_and_empty_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        w.weights_sha256(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no file"):
        w.weights_sha256(tmp_path / "empty")


def test_unwritable_cache_still_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CXRSTORE_CACHE", str(blocker / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"data")
    assert w.weights_sha256(f) == hashlib.sha256(b"data").hexdigest()
    assert "cannot write weights hash cache" in caplog.text


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXRSTORE_CACHE")
    assert w.cache_dir() == Path.home() / ".cache" / "cxrstore"


def test_device_and_half_options() -> None:
    assert w.check_device("cpu") == "cpu" and w.check_device("cuda:1") == "cuda:1"
    for bad in ("gpu", "cuda:x", "cpu:0", 3):
        with pytest.raises(UsageError, match="cpu, cuda"):
            w.check_device(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="needs --device cuda"):
        w.check_half(True, "cpu")
    with pytest.raises(UsageError, match="True or False"):
        w.check_half("yes", "cuda")
    assert w.check_half(True, "cuda") is True and w.check_half(False, "cpu") is False


def test_cuda_refused_without_gpu() -> None:
    torch = pytest.importorskip("torch", reason="torch (extra mii) is not installed")
    if torch.cuda.is_available():
        assert w.resolve_torch_device("cuda").type == "cuda"
        return
    with pytest.raises(UsageError, match="--device cuda requested but .*use --device cpu"):
        w.resolve_torch_device("cuda")
    assert w.resolve_torch_device("cpu").type == "cpu"


def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_torch(name: str, *args: object, **kwargs: object) -> object:
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(UsageError, match=r"cxrstore\[mii\]"):
        w.import_torch("mii", "medimageinsight")


def test_fetch_plan_and_download_only_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from cli.models import fetch_cmd, list_cmd

    spec = w.fetch_plan("medimageinsight")
    assert spec.repo_id == "lion-ai/MedImageInsights" and "2024.09.27/vision_model/medimageinsigt-v1.0.0.pt" in spec.patterns
    with pytest.raises(UsageError, match="fetchable: biomedclip, elixr-v2, medimageinsight, rad-dino"):
        w.fetch_plan("nope")
    calls: list[dict] = []

    def fake_download(**kwargs: object) -> str:
        calls.append(dict(kwargs))
        return str(kwargs["local_dir"])

    runner = CliRunner()
    result = runner.invoke(fetch_cmd, ["medimageinsight", "--to", str(tmp_path / "m"), "--dry-run"])
    assert result.exit_code == 0 and "lion-ai/MedImageInsights" in result.output and "MIT" in result.output
    import cli.models as cm

    monkeypatch.setattr(cm, "fetch_weights", lambda name, to: w.fetch_weights(name, to, downloader=fake_download))
    result = runner.invoke(fetch_cmd, ["medimageinsight", "--to", str(tmp_path / "m")], input="n\n")
    assert "nothing downloaded" in result.output and calls == []
    result = runner.invoke(fetch_cmd, ["elixr-v2", "--to", str(tmp_path / "e"), "--yes"])
    assert result.exit_code == 0 and "gated" in result.output
    assert calls == [{"repo_id": "google/cxr-foundation", "allow_patterns": ["elixr-c-v2-pooled/*", "pax-elixr-b-text/*"], "local_dir": str(tmp_path / "e")}]
    listed = runner.invoke(list_cmd, ["--json"])
    assert {"encoder": "medimageinsight", "fetchable": True, "repo": "lion-ai/MedImageInsights"} in json.loads(listed.output)


def test_importing_cxrstore_and_listing_encoders_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cxrstore.encoders.base import available_encoders\n"
        "import cxrstore.importers, cxrstore.store.views, cli.import_vectors, cli.models\n"
        "assert 'medimageinsight' in available_encoders()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_folder_hash_reads_and_writes_the_cache_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "emb"
    for i in range(30):
        (folder / f"p{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"p{i % 3}" / f"{i}.tfrecord").write_bytes(bytes([i]) * 10)
    writes: list[int] = []
    real_write = w._write_cache
    monkeypatch.setattr(w, "_write_cache", lambda data: (writes.append(len(data)), real_write(data)))
    calls = _count_hashes(monkeypatch)
    first = w.weights_sha256(folder)
    assert len(calls) == 30 and writes == [30]
    assert w.weights_sha256(folder) == first and len(calls) == 30 and writes == [30]  # all cached, nothing written
    assert w.weights_sha256(folder, use_cache=False) == first
