"""torchxrayvision DenseNet: stand-ins in the real file formats, real files ingested end to end."""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (extra xrv) is not installed")
pytest.importorskip("safetensors", reason="safetensors (extra xrv) is not installed")

import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import available_encoders, get_encoder
from cxrstore.encoders.densenet import DENSENET121, DenseNet, arch_from_state_dict
from cxrstore.encoders.xrv import (
    TINY_ARCH,
    center_crop,
    pickled_globals,
    prepare_xrv,
    read_xrv_weights,
    save_release_pickle,
    skimage_resize,
    write_xrv_standin,
)
from cxrstore.errors import UsageError
from cxrstore.ingest import ingest
from cxrstore.store.store import Store
from tests.encoder_checks import (
    check_other_weights_refused,
    check_reencoding_matches_store,
    write_manifest,
)

TINY_DIM = 32  # 16 + 2*8 -> 16 -> 32 -> 16 -> 32 -> 16 -> 32 (TINY_ARCH)



@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model pickled whole, as torchxrayvision's release files are."""
    return write_xrv_standin(tmp_path_factory.mktemp("xrv") / "tiny-densenet-best.pt", fmt="release", seed=1,
                             op_threshs=[0.05] * 17 + [float("nan")])


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, release: Path, real_cxr: Path) -> tuple[Path, list[str]]:
    files = sorted(p.name for p in real_cxr.iterdir() if p.is_file())
    work = tmp_path_factory.mktemp("xrv-store")
    manifest = write_manifest(work / "manifest.csv", files)
    enc = get_encoder("torchxrayvision", weights=release, batch=4)
    report = ingest(work / "store", CsvManifest(manifest, root=real_cxr).records(), encoder=enc, workers=0, batch_size=5)
    assert report.failed == 0, report.failures
    assert report.added == len(files)
    return work / "store", files


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((260, 200), dtype=np.float32), rng.random((224, 224), dtype=np.float32),
            rng.random((90, 120), dtype=np.float32)]


def test_registered_without_importing_torch_at_module_import() -> None:
    assert "torchxrayvision" in available_encoders()


# -- weights formats ---------------------------------------------------------------------
def test_release_file_pickles_the_published_class_path(release: Path) -> None:
    assert "torchxrayvision" not in sys.modules and "torchxrayvision.models" not in sys.modules
    found = set(pickled_globals(release))
    assert {"torchxrayvision.models.DenseNet", "torchxrayvision.models._DenseLayer",
            "torchxrayvision.models._DenseBlock", "torchxrayvision.models._Transition"} <= found
    assert "torch.nn.modules.conv.Conv2d" in found and "torch._utils._rebuild_parameter" in found
    # the standard safe loader refuses it (a whole model is not weights-only) ...
    with pytest.raises(pickle.UnpicklingError, match="torchxrayvision.models.DenseNet"):
        torch.load(release, weights_only=True)
    # ... ours reads it without torchxrayvision importable
    state, meta = read_xrv_weights(release)
    assert meta["format"] == "release" and meta["root_class"] == "torchxrayvision.models.DenseNet"
    assert meta["pathologies"][0] == "Atelectasis" and len(meta["pathologies"]) == 18
    assert meta["op_threshs"][:2] == [pytest.approx(0.05)] * 2 and meta["op_threshs"][-1] is None
    assert "features.denseblock4.denselayer2.conv2.weight" in state and "op_threshs" not in state
    assert "torchxrayvision" not in sys.modules


@pytest.mark.parametrize(("fmt", "legacy"), [("release", False), ("release", True), ("state_dict", False),
                                             ("state_dict", True), ("safetensors", False)])
def test_every_format_loads_to_the_same_model(tmp_path: Path, fmt: str, legacy: bool) -> None:
    ref = write_xrv_standin(tmp_path / "ref.safetensors", fmt="safetensors", seed=3)
    path = write_xrv_standin(tmp_path / f"w-{fmt}.pt", fmt=fmt, legacy=legacy, seed=3)
    state, meta = read_xrv_weights(path)
    assert meta["format"] == fmt
    expected = load_file(str(ref))
    assert sorted(state) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    images = _images(1)
    a = get_encoder("torchxrayvision", weights=path).encode(images)
    b = get_encoder("torchxrayvision", weights=ref).encode(images)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, TINY_DIM) and a.dtype == np.float32


def test_wrapped_and_data_parallel_state_dicts_load(tmp_path: Path) -> None:
    ref = write_xrv_standin(tmp_path / "ref.safetensors", fmt="safetensors", seed=6)
    tensors = load_file(str(ref))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tensors.items()}}, tmp_path / "ckpt.pt")
    state, meta = read_xrv_weights(tmp_path / "ckpt.pt")
    assert meta["format"] == "state_dict" and sorted(state) == sorted(tensors)
    images = _images(4)[:1]
    np.testing.assert_array_equal(get_encoder("torchxrayvision", weights=tmp_path / "ckpt.pt").encode(images),
                                  get_encoder("torchxrayvision", weights=ref).encode(images))


def test_architecture_is_inferred_from_shapes(tmp_path: Path) -> None:
    arch = {"growth_rate": 4, "block_config": [1, 3, 2], "num_init_features": 6, "bn_size": 3}
    path = write_xrv_standin(tmp_path / "odd.pt", fmt="state_dict", num_classes=5, **arch)
    enc = get_encoder("torchxrayvision", weights=path)
    p = enc.config.params
    assert {k: p[k] for k in arch} == arch and p["num_classes"] == 5 and p["in_channels"] == 1
    # 6 +4 = 10 -> 5 +12 = 17 -> 8 +8 = 16
    assert enc.dim == 16 and enc.encode(_images()[:1]).shape == (1, 16)


def test_densenet121_has_the_published_size_and_a_1024_vector() -> None:
    """Parameter count derived from the published layer sizes (DenseNet-BC, k=32, blocks 6-12-24-16)."""
    k, bn, c = 32, 4, 64
    total = c * 1 * 7 * 7 + 2 * c  # conv0 (one input channel, no bias) + norm0 (weight, bias)
    for i, n in enumerate([6, 12, 24, 16]):
        for j in range(n):
            cin = c + j * k  # dense layer: norm1, 1x1 conv to bn*k, norm2, 3x3 conv to k
            total += 2 * cin + cin * bn * k + 2 * bn * k + bn * k * k * 3 * 3
        c += n * k
        if i < 3:  # transition: norm, 1x1 conv halving the channels
            total += 2 * c + c * (c // 2)
            c //= 2
    assert c == 1024
    total += 2 * c + c * 18 + 18  # norm5, classifier (18 pathologies)
    # torchvision's densenet121 (3 input channels, 1000 classes) publishes num_params 7978856:
    # ours differs only by the stem's input channels and the classifier's outputs
    torchvision_121 = 7_978_856
    assert total == torchvision_121 - 64 * 2 * 7 * 7 - (1024 * 1000 + 1000) + (1024 * 18 + 18)
    model = DenseNet(**DENSENET121).eval()
    assert sum(p.numel() for p in model.parameters()) == total
    assert arch_from_state_dict(model.state_dict()) == DENSENET121
    assert "features.denseblock3.denselayer24.conv2.weight" in model.state_dict()
    assert "features.transition3.conv.weight" in model.state_dict() and "features.norm5.running_var" in model.state_dict()
    with torch.inference_mode():
        out = model.features2(torch.randn(1, 1, 224, 224) * 500)
    assert out.shape == (1, 1024) and bool((out >= 0).all())


@pytest.mark.slow
def test_full_size_release_file_through_the_encoder(tmp_path: Path) -> None:
    path = write_xrv_standin(tmp_path / "d121.pt", fmt="release", growth_rate=32, block_config=(6, 12, 24, 16),
                             num_init_features=64, bn_size=4, num_classes=18)
    enc = get_encoder("torchxrayvision", weights=path)
    assert enc.dim == 1024 and enc.native_shape == (1024,)
    assert enc.config.params["block_config"] == [6, 12, 24, 16] and enc.config.params["num_classes"] == 18
    out = enc.encode(_images()[:1])
    assert out.shape == (1, 1024) and out.dtype == np.float32 and np.isfinite(out).all()


# -- the computation ---------------------------------------------------------------------
def _functional_features2(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's features2 written out with torch.nn.functional on a state dict."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            training=False, eps=1e-5)

    h = F.conv2d(x, sd["features.conv0.weight"], stride=2, padding=3)
    h = F.max_pool2d(F.relu(bn(h, "features.norm0")), kernel_size=3, stride=2, padding=1)
    b = 1
    while f"features.denseblock{b}.denselayer1.conv1.weight" in sd:
        n = 1
        while f"features.denseblock{b}.denselayer{n}.conv1.weight" in sd:
            p = f"features.denseblock{b}.denselayer{n}"
            y = F.conv2d(F.relu(bn(h, p + ".norm1")), sd[p + ".conv1.weight"])
            y = F.conv2d(F.relu(bn(y, p + ".norm2")), sd[p + ".conv2.weight"], padding=1)
            h = torch.cat([h, y], 1)
            n += 1
        if f"features.transition{b}.conv.weight" in sd:
            p = f"features.transition{b}"
            h = F.avg_pool2d(F.conv2d(F.relu(bn(h, p + ".norm")), sd[p + ".conv.weight"]), 2, 2)
        b += 1
    h = F.relu(bn(h, "features.norm5"))
    return h.mean(dim=(2, 3))


def test_forward_matches_functional_features2(tmp_path: Path) -> None:
    path = write_xrv_standin(tmp_path / "w.safetensors", fmt="safetensors", seed=5)
    enc = get_encoder("torchxrayvision", weights=path)
    images = _images(2)
    out = enc.encode(images)
    sd = load_file(str(path))
    x = torch.from_numpy(np.stack([prepare_xrv(im) for im in images]))[:, None]
    assert float(x.min()) >= -1024 and float(x.max()) <= 1024 and float(x.max()) > 500
    with torch.no_grad():
        ref = _functional_features2(sd, x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.linalg.norm(out, axis=1), 1.0)  # no L2 normalisation, as published


def _reference_resize(img: np.ndarray, n: int) -> np.ndarray:
    """skimage.transform.resize(mode="constant", preserve_range=True) from its documented algorithm.

    Gaussian anti-aliasing (sigma = (s - 1) / 2, truncated at 4 sigma) when shrinking,
    then bilinear sampling at output pixel centres, zero outside the image, then clipping
    to the input's range. Plain float64 numpy, independent of scipy.ndimage.
    """
    img = img.astype(np.float64)
    s = img.shape[0] / n
    if s > 1:
        sigma = (s - 1) / 2
        r = int(4 * sigma + 0.5)
        w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        w /= w.sum()
        for axis in (0, 1):
            pad = [(0, 0), (0, 0)]
            pad[axis] = (r, r)
            p = np.pad(img, pad)  # zeros
            img = sum(w[i] * np.take(p, np.arange(i, i + img.shape[axis]), axis=axis) for i in range(2 * r + 1))
    u = (np.arange(n) + 0.5) * s - 0.5
    i0 = np.floor(u).astype(int)
    f = u - i0
    p = np.pad(img, 1)  # zero border; index shift +1

    def sample(a: np.ndarray, axis: int) -> np.ndarray:
        lo = np.take(a, i0 + 1, axis=axis)
        hi = np.take(a, i0 + 2, axis=axis)
        shape = [1, 1]
        shape[axis] = n
        return lo * (1 - f).reshape(shape) + hi * f.reshape(shape)

    out = sample(sample(p, 0), 1)
    lo, hi = img.min(), img.max()
    if not lo <= 0 <= hi and out.min() <= 0 <= out.max():  # the zero padding shows: range widened to 0
        lo, hi = min(lo, 0), max(hi, 0)
    return np.clip(out, lo, hi)


def test_prepare_matches_published_transforms() -> None:
    rng = np.random.default_rng(4)
    img = rng.random((300, 451), dtype=np.float32)
    # normalize(img, maxval): (2 * img / maxval - 1) * 1024; XRayCenterCrop: start = side//2 - crop//2
    scaled = (2 * img - 1) * np.float32(1024)
    crop = scaled[0:300, 225 - 150 : 225 - 150 + 300]
    np.testing.assert_array_equal(center_crop(scaled), crop)
    ours = prepare_xrv(img)
    assert ours.shape == (224, 224) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _reference_resize(crop, 224), atol=2e-3)
    # upscaling (no anti-aliasing) a bright image: the zero padding pulls the border down, the clip
    # to the input range (skimage clip=True) lifts it back
    small = (0.8 + 0.2 * rng.random((150, 150))).astype(np.float32)
    np.testing.assert_allclose(prepare_xrv(small), _reference_resize((2 * small - 1) * 1024, 224), atol=2e-3)
    np.testing.assert_array_equal(skimage_resize(crop[None], (1, 224, 224))[0], ours)
    with pytest.raises(UsageError, match="2-D"):
        prepare_xrv(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(UsageError, match="NaN"):
        prepare_xrv(np.full((8, 8), np.nan, np.float32))


# -- refusing what must not load ---------------------------------------------------------
class _Evil:
    def __init__(self, fn: object, arg: str) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return self.fn, (self.arg,)


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    cases = [
        (os.system, f"touch {marker}", f"{os.system.__module__}.system"),
        (eval, f"open({str(marker)!r}, 'w').write('x')", "builtins.eval"),
    ]
    for fn, arg, name in cases:
        path = tmp_path / f"evil-{name}.pt"
        torch.save({"features.conv0.weight": torch.zeros(1), "x": _Evil(fn, arg)}, path,
                   _use_new_zipfile_serialization=not legacy)
        with pytest.raises(UsageError) as err:
            read_xrv_weights(path)
        assert name in str(err.value) and str(path) in str(err.value)
        assert not marker.exists()
    # hidden inside a real-looking release model
    model_path = write_xrv_standin(tmp_path / "ok.pt", fmt="release", legacy=legacy)
    model = DenseNet(**TINY_ARCH)
    model.features.norm0.extra = _Evil(os.system, f"touch {marker}")
    save_release_pickle(model, model_path, legacy=legacy)
    with pytest.raises(UsageError, match=r"global posix\.system|global os\.system"):
        get_encoder("torchxrayvision", weights=model_path)
    assert not marker.exists()


def test_old_style_release_file_loads(tmp_path: Path) -> None:
    """Legacy serialisation, modules carrying the old `_backend`, no num_batches_tracked."""
    import torch.nn.backends.thnn as thnn

    class _Backend:
        def __reduce__(self) -> tuple[object, tuple[()]]:
            return thnn._get_thnn_function_backend, ()

    ref = write_xrv_standin(tmp_path / "ref.safetensors", fmt="safetensors", seed=8)
    model = DenseNet(**TINY_ARCH)
    model.load_state_dict(load_file(str(ref)))
    for mod in model.modules():
        mod._backend = _Backend()
        mod.__dict__.pop("_non_persistent_buffers_set", None)
        if "num_batches_tracked" in mod._buffers:
            del mod._buffers["num_batches_tracked"]
    path = save_release_pickle(model, tmp_path / "old.pt", legacy=True)
    assert "torch.nn.backends.thnn._get_thnn_function_backend" in pickled_globals(path)
    images = _images(3)
    np.testing.assert_array_equal(get_encoder("torchxrayvision", weights=path).encode(images),
                                  get_encoder("torchxrayvision", weights=ref).encode(images))


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path: Path) -> None:
    good = write_xrv_standin(tmp_path / "good.safetensors", fmt="safetensors")
    tensors = load_file(str(good))
    del tensors["features.denseblock2.denselayer1.norm2.running_mean"]
    tensors["features.extra.weight"] = torch.zeros(2)
    tensors["features.transition1.conv.weight"] = torch.zeros(3, 32, 1, 1)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(UsageError) as err:
        get_encoder("torchxrayvision", weights=bad)
    msg = str(err.value)
    assert str(bad) in msg
    assert "1 missing key(s): features.denseblock2.denselayer1.norm2.running_mean" in msg
    assert "1 unexpected key(s): features.extra.weight" in msg
    assert "shape mismatch(es): features.transition1.conv.weight (3, 32, 1, 1) != (16, 32, 1, 1)" in msg
    # not a DenseNet at all: the key needed to infer the architecture is named
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UsageError, match=r"missing key features\.conv0\.weight"):
        get_encoder("torchxrayvision", weights=tmp_path / "other.safetensors")
    # three input channels (an ImageNet DenseNet) is not a torchxrayvision model
    path = write_xrv_standin(tmp_path / "rgb.safetensors", fmt="safetensors")
    t = load_file(str(path))
    t["features.conv0.weight"] = torch.zeros(16, 3, 7, 7)
    save_file(t, str(path))
    with pytest.raises(UsageError, match="3 input channels"):
        get_encoder("torchxrayvision", weights=path)
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    with pytest.raises(UsageError, match=r"junk\.pt: not a torch or safetensors file"):
        get_encoder("torchxrayvision", weights=tmp_path / "junk.pt")
    with pytest.raises(UsageError, match="does not exist"):
        get_encoder("torchxrayvision", weights=tmp_path / "nowhere.pt")
    with pytest.raises(UsageError, match="not a file"):
        get_encoder("torchxrayvision", weights=tmp_path)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="neither a pickled model nor a state dict"):
        get_encoder("torchxrayvision", weights=tmp_path / "list.pt")


# building a real TorchScript archive needs torch.jit.script and torch.jit.save, deprecated in
# torch 2.13 (the warnings are about writing TorchScript, which only this test does)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "scripted.pt"
    torch.jit.save(scripted, str(path))
    with pytest.raises(UsageError, match="TorchScript"):
        read_xrv_weights(path)


def test_options_validated(release: Path) -> None:
    with pytest.raises(UsageError, match="allowed: weights, device, batch, half"):
        get_encoder("torchxrayvision", weights=release, colour=True)
    with pytest.raises(UsageError, match="needs --device cuda"):
        get_encoder("torchxrayvision", weights=release, half=True)
    with pytest.raises(UsageError, match="batch must be a positive integer"):
        get_encoder("torchxrayvision", weights=release, batch=0)
    with pytest.raises(UsageError, match="unknown device"):
        get_encoder("torchxrayvision", weights=release, device="tpu")
    with pytest.raises(UsageError, match="needs weights="):
        get_encoder("torchxrayvision")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="use --device cpu"):
            get_encoder("torchxrayvision", weights=release, device="cuda")
    enc = get_encoder("torchxrayvision", weights=release)
    with pytest.raises(UsageError, match=r"shape \(224, 224\)"):
        enc.forward([np.zeros((100, 100), np.float32)])


def test_preparer_is_picklable(release: Path) -> None:
    enc = get_encoder("torchxrayvision", weights=release)
    prep = pickle.loads(pickle.dumps(enc.preparer()))
    img = _images()[0]
    np.testing.assert_array_equal(prep(img), prepare_xrv(img))


# -- end to end --------------------------------------------------------------------------
@pytest.mark.slow
def test_ingest_real_files_end_to_end(ingested: tuple[Path, list[str]], release: Path) -> None:
    store_path, files = ingested
    store = Store(store_path)
    vecs = store.select(model="torchxrayvision").vectors()
    assert vecs.shape == (len(files), TINY_DIM) and vecs.dtype == np.float32
    assert np.isfinite(vecs).all() and (vecs >= 0).all()  # features2 ends with a ReLU
    assert len({v.tobytes() for v in vecs}) == len(files)
    prov = store.provenance("torchxrayvision")
    assert prov["encoder"]["weights_sha256"] == hashlib.sha256(release.read_bytes()).hexdigest()
    params = prov["encoder"]["params"]
    assert params["input_size"] == [224, 224] and params["input_scaling"] == [-1024, 1024]
    assert params["output"] == "features2" and params["output_norm"] == "none" and params["crop"] == "center-square"
    assert params["block_config"] == TINY_ARCH["block_config"] and params["growth_rate"] == TINY_ARCH["growth_rate"]
    assert params["weights_format"] == "release" and params["precision"] == "float32"
    assert params["op_threshs"][-1] is None and math.isclose(params["op_threshs"][0], 0.05, rel_tol=1e-6)
    assert prov["native_shape"] == [TINY_DIM]


@pytest.mark.slow
def test_deterministic_and_batch_independent(ingested: tuple[Path, list[str]], release: Path, real_cxr: Path) -> None:
    store_path, files = ingested
    enc = get_encoder("torchxrayvision", weights=release)  # another instance, no micro-batching
    check_reencoding_matches_store(store_path, "torchxrayvision", enc, real_cxr, files[:3], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_different_weights_refused_into_same_model(ingested: tuple[Path, list[str]], tmp_path: Path, real_cxr: Path) -> None:
    store_path, files = ingested
    other = get_encoder("torchxrayvision", weights=write_xrv_standin(tmp_path / "other.pt", fmt="release", seed=9))
    check_other_weights_refused(store_path, real_cxr, files[0], other)


def test_cli_ingest_with_weights_and_info_shows_provenance(release: Path, real_cxr: Path, tmp_path: Path) -> None:
    """`cxrstore ingest --encoder torchxrayvision --weights FILE`, then `cxrstore info`."""
    from cxrstore.encoders.weights import weights_sha256
    from tests.encoder_checks import ingest_then_info

    entry, _ = ingest_then_info(real_cxr, tmp_path, "torchxrayvision", release)
    prov = entry["provenance"]
    assert prov["encoder"]["weights_sha256"] == weights_sha256(release)
    assert prov["encoder"]["params"]["output"] == "features2"
    assert prov["native_shape"] == [entry["dim"]] == [TINY_DIM]
