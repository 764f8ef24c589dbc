"""Importing precomputed embeddings: every format, every refusal, TFRecord without TensorFlow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.import_vectors import import_cmd
from cxrstore.errors import ProvenanceError, UsageError
from cxrstore.importers import (
    decode_example,
    encode_example,
    import_vectors,
    iter_source,
    read_tfrecord,
    write_tfrecord,
)
from cxrstore.schemas import validate
from cxrstore.store.store import Store

IDS = [f"img{i:02d}" for i in range(6)]



def _manifest(tmp_path: Path, ids: list[str] = IDS) -> Path:
    lines = ["image_id,path,patient_id,study_id,view,sex,age,Effusion"]
    for i, iid in enumerate(ids):
        lines.append(f"{iid},files/{iid}.png,pat{i // 2},st{i},PA,{'F' if i % 2 else 'M'},{40 + i},{i % 2}")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _vectors(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


# -- npz ------------------------------------------------------------------------------------
def test_npz_keyed_by_id_with_manifest_rows_and_refusals(tmp_path: Path) -> None:
    vecs = _vectors(5, (32, 128))
    data = {iid: vecs[i] for i, iid in enumerate(IDS[:4])}
    bad = vecs[4].copy()
    bad[3, 7] = np.nan
    data["img04"] = bad
    inf = vecs[0].copy()
    inf[0, 0] = np.inf
    data["img05"] = inf
    data["stranger"] = vecs[1]
    src = tmp_path / "nih_v2.npz"
    np.savez(src, **data)
    manifest = _manifest(tmp_path)
    report = import_vectors(tmp_path / "s", src, model="elixr-v2-contrastive", manifest=manifest, source_model="elixr-v2 contrastive")
    assert (report.added, report.failed, report.unmatched) == (4, 3, 1)
    assert report.unmatched_examples == ["stranger"]
    assert report.dim == 4096 and report.native_shape == [32, 128]
    assert report.manifest_without_vector == 2 and sorted(report.manifest_without_vector_examples) == ["img04", "img05"]
    reasons = {f["image_id"]: f["reason"] for f in report.failures}
    assert "NaN or infinite" in reasons["img04"] and "NaN or infinite" in reasons["img05"]
    assert "no row for this id" in reasons["stranger"]

    store = Store(tmp_path / "s")
    meta = store.metadata()
    assert meta["image_id"].tolist() == IDS[:4]
    assert meta["patient_id"].tolist() == ["pat0", "pat0", "pat1", "pat1"]
    assert meta["sex"].tolist() == ["M", "F", "M", "F"] and meta["age"].tolist() == [40.0, 41.0, 42.0, 43.0]
    assert meta["Effusion"].tolist() == [0.0, 1.0, 0.0, 1.0]
    got = store.select(model="elixr-v2-contrastive").vectors()
    np.testing.assert_array_equal(got, vecs[:4].reshape(4, -1))
    failures = store.failures()
    assert set(failures["image_id"]) == {"img04", "img05", "stranger"}
    prov = store.provenance("elixr-v2-contrastive")
    assert prov["encoder"]["encoder"] == "precomputed" and prov["native_shape"] == [32, 128]
    assert prov["encoder"]["params"]["source"] == "nih_v2.npz"
    assert prov["encoder"]["params"]["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert prov["encoder"]["params"]["source_model"] == "elixr-v2 contrastive"
    assert validate(prov, "model-provenance-v1") == []

    again = import_vectors(tmp_path / "s", src, model="elixr-v2-contrastive", manifest=manifest, source_model="elixr-v2 contrastive")
    assert again.added == 0 and again.skipped == 4 and Store(tmp_path / "s").n_rows == 4

    other = tmp_path / "other.npz"
    np.savez(other, **{k: v for k, v in data.items() if k in IDS[:2]})
    with pytest.raises(ProvenanceError, match="source_sha256"):
        import_vectors(tmp_path / "s", other, model="elixr-v2-contrastive", manifest=manifest, source_model="elixr-v2 contrastive")


def test_npz_with_id_and_vector_arrays(tmp_path: Path) -> None:
    vecs = _vectors(3, (1376,))
    src = tmp_path / "m.npz"
    np.savez(src, ids=np.array(IDS[:3]), emb=vecs)
    items = list(iter_source(src, ids_key="ids", vectors_key="emb"))
    assert [i.image_id for i in items] == IDS[:3]
    np.testing.assert_array_equal(np.stack([i.vector for i in items]), vecs)
    with pytest.raises(UsageError, match="ids, emb"):
        list(iter_source(src, ids_key="ids", vectors_key="vectors"))


# -- npy: fill existing rows -------------------------------------------------------------------
def test_npy_with_id_list_fills_existing_rows(tmp_path: Path) -> None:
    first = tmp_path / "first.npz"
    np.savez(first, **{iid: v for iid, v in zip(IDS, _vectors(6, (1024,)))})
    import_vectors(tmp_path / "s", first, model="a", manifest=_manifest(tmp_path))
    vecs = _vectors(4, (1376,), seed=1)
    src = tmp_path / "v1.npy"
    np.save(src, vecs)
    ids = tmp_path / "ids.txt"
    ids.write_text("img03\nimg01\nimg00\nnot-there\n")
    report = import_vectors(tmp_path / "s", src, model="elixr-v1", ids=ids)
    assert (report.filled, report.added, report.unmatched) == (3, 0, 1)
    assert "give --manifest" in report.failures[0]["reason"]
    store = Store(tmp_path / "s")
    sel = store.select(model="elixr-v1")
    assert store.column("image_id", sel.rows).tolist() == ["img00", "img01", "img03"]
    np.testing.assert_array_equal(sel.vectors(), vecs[[2, 1, 0]])
    prov = store.provenance("elixr-v1")
    assert prov["native_shape"] == [1376] and prov["encoder"]["params"]["ids_sha256"] == hashlib.sha256(ids.read_bytes()).hexdigest()
    with pytest.raises(UsageError, match="needs --ids"):
        import_vectors(tmp_path / "s", src, model="x")
    ids.write_text("img00\nimg01\n")
    with pytest.raises(UsageError, match="2 ids but 4 vectors"):
        import_vectors(tmp_path / "s", src, model="x", ids=ids)


# -- h5 --------------------------------------------------------------------------------------
def test_h5_named_datasets(tmp_path: Path) -> None:
    vecs = _vectors(4, (32, 768))
    src = tmp_path / "emb.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("grp/features", data=vecs.reshape(4, -1))
        f.create_dataset("grp/names", data=np.array([s.encode() for s in IDS[:4]]))
    report = import_vectors(tmp_path / "s", src, model="elixr-v2", ids_key="grp/names", vectors_key="grp/features", manifest=_manifest(tmp_path))
    assert report.added == 4 and report.failed == 0
    assert report.native_shape == [32, 768] and report.dim == 24576
    np.testing.assert_array_equal(Store(tmp_path / "s").select(model="elixr-v2").vectors(), vecs.reshape(4, -1))
    with pytest.raises(UsageError, match="datasets are: grp/features, grp/names"):
        import_vectors(tmp_path / "s2", src, model="m")


# -- parquet ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["list", "fixed", "columns"])
def test_parquet_layouts(tmp_path: Path, layout: str) -> None:
    vecs = _vectors(3, (24,))
    if layout == "list":
        table = pa.table({"image_id": IDS[:3], "vec": pa.array(vecs.tolist(), type=pa.list_(pa.float32()))})
    elif layout == "fixed":
        table = pa.table({"image_id": IDS[:3], "vec": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 24)})
    else:
        table = pa.table({"image_id": IDS[:3], **{f"d{j}": vecs[:, j] for j in range(24)}})
    src = tmp_path / "emb.parquet"
    pq.write_table(table, src)
    report = import_vectors(tmp_path / "s", src, model="p", dim=24, manifest=_manifest(tmp_path))
    assert report.added == 3 and report.failed == 0 and report.native_shape == [24]
    np.testing.assert_array_equal(Store(tmp_path / "s").select(model="p").vectors(), vecs)


def test_parquet_null_and_short_vectors_fail_per_row(tmp_path: Path) -> None:
    table = pa.table({"id": ["img00", "img01", "img02"], "v": pa.array([[1.0, 2.0], None, [1.0]], type=pa.list_(pa.float64()))})
    src = tmp_path / "e.parquet"
    pq.write_table(table, src)
    report = import_vectors(tmp_path / "s", src, model="p", dim=2, id_column="id", manifest=_manifest(tmp_path))
    assert report.added == 1 and report.failed == 2
    reasons = {f["image_id"]: f["reason"] for f in report.failures}
    assert reasons["img01"] == "vector is null" and "has 1 values, expected 2" in reasons["img02"]
    with pytest.raises(UsageError, match="id column 'image_id' not found"):
        import_vectors(tmp_path / "s", src, model="q", dim=2)


# -- tfrecord --------------------------------------------------------------------------------
def _example_class():
    """tf.train.Example built with protobuf from a descriptor (no TensorFlow)."""
    pytest.importorskip("google.protobuf", reason="protobuf is not installed (optional cross-check)")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="cxrstore_test_example.proto", package="cxrtest", syntax="proto3")
    L = descriptor_pb2.FieldDescriptorProto
    for name, ftype, packed in (("BytesList", L.TYPE_BYTES, False), ("FloatList", L.TYPE_FLOAT, True), ("Int64List", L.TYPE_INT64, True)):
        m = fdp.message_type.add(name=name)
        f = m.field.add(name="value", number=1, label=L.LABEL_REPEATED, type=ftype)
        if packed:
            f.options.packed = True
    feat = fdp.message_type.add(name="Feature")
    feat.oneof_decl.add(name="kind")
    for i, (fname, tname) in enumerate((("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), start=1):
        feat.field.add(name=fname, number=i, label=L.LABEL_OPTIONAL, type=L.TYPE_MESSAGE, type_name=f".cxrtest.{tname}", oneof_index=0)
    feats = fdp.message_type.add(name="Features")
    entry = feats.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=L.LABEL_OPTIONAL, type=L.TYPE_STRING)
    entry.field.add(name="value", number=2, label=L.LABEL_OPTIONAL, type=L.TYPE_MESSAGE, type_name=".cxrtest.Feature")
    feats.field.add(name="feature", number=1, label=L.LABEL_REPEATED, type=L.TYPE_MESSAGE, type_name=".cxrtest.Features.FeatureEntry")
    ex = fdp.message_type.add(name="Example")
    ex.field.add(name="features", number=1, label=L.LABEL_OPTIONAL, type=L.TYPE_MESSAGE, type_name=".cxrtest.Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("cxrtest.Example"))


def test_example_codec_agrees_with_protobuf() -> None:
    Example = _example_class()
    emb = np.random.default_rng(0).standard_normal(1376).astype(np.float32)
    ours = encode_example({"embedding": emb, "image/id": [b"abc"], "n": np.array([3, -2])})
    msg = Example()
    msg.ParseFromString(ours)
    np.testing.assert_array_equal(np.array(msg.features.feature["embedding"].float_list.value, dtype=np.float32), emb)
    assert list(msg.features.feature["image/id"].bytes_list.value) == [b"abc"]
    assert list(msg.features.feature["n"].int64_list.value) == [3, -2]
    # and the other way round, with protobuf's own serialization
    msg2 = Example()
    msg2.features.feature["embedding"].float_list.value.extend(emb.tolist())
    msg2.features.feature["label"].int64_list.value.extend([7, -1, 2**40])
    msg2.features.feature["image/format"].bytes_list.value.append(b"png")
    decoded = decode_example(msg2.SerializeToString())
    np.testing.assert_array_equal(decoded["embedding"][1], emb)
    np.testing.assert_array_equal(decoded["label"][1], [7, -1, 2**40])
    assert decoded["image/format"] == ("bytes", [b"png"])


def test_unpacked_float_list_decodes() -> None:
    # FloatList with each value as its own fixed32 field (older writers)
    vals = np.array([1.5, -2.25], dtype="<f4")
    floatlist = b"".join(b"\x0d" + v.tobytes() for v in vals)  # field 1, wire type 5
    feature = b"\x12" + bytes([len(floatlist)]) + floatlist  # Feature.float_list = 2
    entry = b"\x0a\x01e" + b"\x12" + bytes([len(feature)]) + feature
    features = b"\x0a" + bytes([len(entry)]) + entry
    example = b"\x0a" + bytes([len(features)]) + features
    np.testing.assert_array_equal(decode_example(example)["e"][1], vals)


def test_tfrecord_framing_and_crc(tmp_path: Path) -> None:
    path = tmp_path / "x.tfrecord"
    write_tfrecord(path, [b"hello", b"", b"world" * 100])
    assert read_tfrecord(path) == [b"hello", b"", b"world" * 100]
    raw = path.read_bytes()
    assert int.from_bytes(raw[:8], "little") == 5 and raw[12:17] == b"hello"  # length, its crc, data, its crc
    import crc32c

    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the Castagnoli check value
    raw = bytearray(path.read_bytes())
    raw[14] ^= 0xFF  # inside the first record's data
    path.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="data CRC mismatch at record 0"):
        read_tfrecord(path)
    path.write_bytes(bytes(raw[:10]))
    with pytest.raises(UsageError, match="truncated"):
        read_tfrecord(path)


def test_tfrecord_cross_check_with_tensorflow(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed (optional cross-check)")
    emb = np.arange(1376, dtype=np.float32)
    path = tmp_path / "a.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        ex = tf.train.Example(features=tf.train.Features(feature={"embedding": tf.train.Feature(float_list=tf.train.FloatList(value=emb))}))
        w.write(ex.SerializeToString())
    np.testing.assert_array_equal(decode_example(read_tfrecord(path)[0])["embedding"][1], emb)


def test_tfrecord_folder_of_google_layout(tmp_path: Path) -> None:
    root = tmp_path / "mimic-emb"
    ids = ["d1", "d2", "d3", "d4", "d5"]
    vecs = _vectors(5, (1376,))
    for i, (iid, subj, study) in enumerate(zip(ids, ["10000032", "10000032", "11000011", "12000012", "12000012"], ["50414267", "50414267", "51000001", "52000001", "52000002"])):
        folder = root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        if iid == "d4":
            write_tfrecord(folder / f"{iid}.tfrecord", [encode_example({"other": vecs[i]})])
        else:
            write_tfrecord(folder / f"{iid}.tfrecord", [encode_example({"embedding": vecs[i]})])
    bad = root / "files" / "p12" / "p12000012" / "s52000002" / "d5.tfrecord"
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0x01
    bad.write_bytes(bytes(raw))
    manifest = _manifest(tmp_path, ids)
    report = import_vectors(tmp_path / "s", root, model="elixr-v1", manifest=manifest)
    assert report.format == "tfrecord" and report.dim == 1376 and report.native_shape == [1376]
    assert report.added == 3 and report.failed == 2
    reasons = {f["image_id"]: f["reason"] for f in report.failures}
    assert "no feature 'embedding'; features: other" in reasons["d4"] and "CRC mismatch" in reasons["d5"]
    assert {f["path"] for f in report.failures} >= {"files/p12/p12000012/s52000002/d5.tfrecord"}
    store = Store(tmp_path / "s")
    np.testing.assert_array_equal(store.select(model="elixr-v1").vectors(), vecs[:3])
    assert store.provenance("elixr-v1")["encoder"]["params"]["feature"] == "embedding"


# -- dimensions -------------------------------------------------------------------------------
def test_dimension_rules(tmp_path: Path) -> None:
    src = tmp_path / "odd.npz"
    np.savez(src, img00=np.ones(100, np.float32), img01=np.ones(99, np.float32))
    with pytest.raises(UsageError, match="100 values, not a known size .*--dim 100"):
        import_vectors(tmp_path / "s", src, model="m", manifest=_manifest(tmp_path))
    report = import_vectors(tmp_path / "s", src, model="m", dim=100, manifest=_manifest(tmp_path))
    assert report.added == 1 and "has 99 values, expected 100" in report.failures[0]["reason"]
    with pytest.raises(UsageError, match="has 4096 values, not the declared dim 100"):
        import_vectors(tmp_path / "s", src, model="m2", dim=100, native_shape=(32, 128))
    # a declared native shape without dim sets the dim, and is recorded
    src2 = tmp_path / "flat.npz"
    np.savez(src2, img00=np.ones(4096, np.float32))
    report = import_vectors(tmp_path / "s", src2, model="m3", native_shape=(64, 64), manifest=_manifest(tmp_path))
    assert report.native_shape == [64, 64] and Store(tmp_path / "s").provenance("m3")["native_shape"] == [64, 64]
    # without it, 4096 is taken as ELIXR v2's 32x128
    assert import_vectors(tmp_path / "s", src2, model="m4", manifest=_manifest(tmp_path)).native_shape == [32, 128]
    with pytest.raises(UsageError, match="unknown format"):
        import_vectors(tmp_path / "s", src2, model="m5", format="csv")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="from its suffix"):
        (tmp_path / "v.bin").write_bytes(b"")
        import_vectors(tmp_path / "s", tmp_path / "v.bin", model="m5")


# -- CLI --------------------------------------------------------------------------------------
def test_cli_import(tmp_path: Path) -> None:
    src = tmp_path / "e.npz"
    np.savez(src, img00=np.ones(1024, np.float32), img01=np.full(1024, 2, np.float32), ghost=np.ones(1024, np.float32))
    manifest = _manifest(tmp_path)
    runner = CliRunner()
    result = runner.invoke(import_cmd, [str(tmp_path / "s"), "--vectors", str(src), "--model", "mii", "--manifest", str(manifest), "--json"])
    assert result.exit_code == 3, result.output  # partial: one id without a row
    out = json.loads(result.output)
    assert out["added"] == 2 and out["unmatched"] == 1 and out["unmatched_examples"] == ["ghost"]
    result = runner.invoke(import_cmd, [str(tmp_path / "s"), "--vectors", str(src), "--model", "mii", "--manifest", str(manifest)])
    assert "2 skipped as already present" in result.output and "ghost" in result.output
    result = runner.invoke(import_cmd, [str(tmp_path / "s"), "--vectors", str(src), "--model", "z", "--native-shape", "3,a"])
    assert result.exit_code == 2 and "32,768" in result.output


def test_id_suffixes(tmp_path: Path) -> None:
    src = tmp_path / "nih.npz"
    np.savez(src, **{"img00.png": np.ones(1024, np.float32), "img01.png": np.zeros(1024, np.float32)})
    manifest = _manifest(tmp_path)
    report = import_vectors(tmp_path / "s", src, model="a", manifest=manifest)
    assert report.unmatched == 2 and report.known_id_example == "img00"
    report = import_vectors(tmp_path / "s", src, model="b", manifest=manifest, strip_suffix=".png")
    assert report.added == 2 and report.unmatched == 0
    assert Store(tmp_path / "s").provenance("b")["encoder"]["params"]["strip_suffix"] == ".png"
