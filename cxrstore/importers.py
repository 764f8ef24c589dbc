"""Import precomputed embeddings (``precomputed``): vectors made elsewhere, keyed by image id.

Sources
-------
``npz``
    One array per key, the key being the image id (Google's 2,737 NIH ELIXR v2
    contrastive embeddings, 32x128 each, are published this way). With ``ids_key`` and
    ``vectors_key`` given, an npz holding an id array and a vector matrix instead.
``npy``
    An ``(n, ...)`` array plus ``ids`` (a text file, one id per line, in the array's
    row order). Read memory-mapped, in slices.
``h5``
    An HDF5 file with a vectors dataset ``vectors_key`` (default ``embeddings``) of shape
    ``(n, ...)`` and an ids dataset ``ids_key`` (default ``ids``; strings or bytes).
``parquet``
    An id column (``id_column``, default ``image_id``) and either one list or
    fixed-size-list column of floats (``vector_column``, or the only list column), or
    one numeric column per dimension (every other numeric column, in schema order).
``tfrecord``
    Google's per-image files ``files/pXX/p<subject>/s<study>/<dicom_id>.tfrecord`` (a
    folder is searched recursively; the id is the file name without ``.tfrecord``),
    each holding one ``tf.train.Example`` with the float list ``embedding`` (1376
    values for ELIXR v1). The TFRecord framing (little-endian uint64 length, masked
    crc32c of the length, data, masked crc32c of the data) is checked and the Example
    protobuf is decoded by the small wire-format decoder of this module
    (Example -> Features -> map<string, Feature> -> FloatList / BytesList /
    Int64List, packed and unpacked repeated fields): TensorFlow is not needed.

Rows
----
Each id is matched to a row: an existing store row with that image id (variant
``original``) is filled; otherwise, with a ``manifest``, a new row is created from the
manifest row with its metadata and labels (the ``sha256`` column stays empty: no image
file was read). An id found in neither is a failure record ("no row ..."), counted
under ``unmatched`` with examples: nothing is dropped silently. Manifest rows the source
left without a vector (none in the source, or one refused) are counted too
(``manifest_without_vector``). A row that already holds
a committed vector of the model is skipped, so re-running an import is idempotent.

Checks
------
Dimensions: every vector must have ``dim`` values (flattened); without ``dim`` the
first vector decides, and must be one of the known sizes (:data:`KNOWN_SHAPES`: 1376
ELIXR v1, 4096 = 32x128 ELIXR v2 contrastive, 24,576 = 32x768 ELIXR v2 general, 1024,
512, 768) unless declared. The native shape is the declared ``native_shape``, else the
per-id array's own shape when it has more than one axis, else the known shape of that
size. A vector of another size, or one holding NaN or infinity, is a per-row failure
record; the rest are imported.

Provenance
----------
``encoder = {"encoder": "precomputed", "version": "1", "params": {"format", "source",
"source_sha256", "ids_file", "ids_sha256", "source_model", keys/columns used},
"weights_sha256": null}``, ``native_shape``, and ``preprocess = {"max_side": null,
"source": "external"}``. Importing another source file into the same model is refused
(its sha256 differs): import it under another model name.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cxrstore import __version__
from cxrstore.datasets.base import ImageRecord, RecordError
from cxrstore.encoders.weights import weights_sha256
from cxrstore.errors import CxrStoreError, UsageError
from cxrstore.store.store import _now, open_writer

__all__ = [
    "FORMATS",
    "KNOWN_SHAPES",
    "ImportReport",
    "decode_example",
    "encode_example",
    "import_vectors",
    "iter_source",
    "read_tfrecord",
    "write_tfrecord",
]

logger = logging.getLogger(__name__)

Format = Literal["npz", "npy", "h5", "parquet", "tfrecord"]
FORMATS: tuple[str, ...] = ("npz", "npy", "h5", "parquet", "tfrecord")

#: Known flat sizes and the native shape assumed for each when none is declared.
KNOWN_SHAPES: dict[int, tuple[int, ...]] = {
    1376: (1376,),  # ELIXR v1 / CXR Foundation v1 pooled image embedding
    4096: (32, 128),  # ELIXR v2 all_contrastive_img_emb
    24576: (32, 768),  # ELIXR v2 img_emb
    1024: (1024,),  # MedImageInsight, torchxrayvision DenseNet121, CheXFound
    768: (768,),  # RAD-DINO CLS
    512: (512,),  # BiomedCLIP
}

_SLICE = 4096
_MAX_EXAMPLES = 10
_SUFFIXES = {
    ".npz": "npz",
    ".npy": "npy",
    ".h5": "h5",
    ".hdf5": "h5",
    ".hdf": "h5",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".tfrecord": "tfrecord",
    ".tfrecords": "tfrecord",
}


@dataclasses.dataclass
class SourceItem:
    """One id from a source: its vector, or why it has none."""

    image_id: str
    vector: np.ndarray | None
    error: str = ""
    where: str = ""


# =========================================================================================
# TFRecord and tf.train.Example, without TensorFlow
# =========================================================================================
_CRC_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    import crc32c

    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def read_tfrecord(path: str | Path) -> list[bytes]:
    """The records of a TFRecord file, CRCs checked.

    Raises
    ------
    UsageError
        On a truncated file or a CRC mismatch (naming the file and record number).
    """
    data = Path(path).read_bytes()
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        n = len(out)
        if pos + 12 > len(data):
            raise UsageError(f"{path}: truncated TFRecord header at record {n}")
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if _masked_crc(header) != len_crc:
            raise UsageError(f"{path}: TFRecord length CRC mismatch at record {n} (corrupt or not a TFRecord file)")
        start = pos + 12
        end = start + length
        if end + 4 > len(data):
            raise UsageError(f"{path}: truncated TFRecord data at record {n} ({length} bytes announced)")
        record = data[start:end]
        (data_crc,) = struct.unpack("<I", data[end : end + 4])
        if _masked_crc(record) != data_crc:
            raise UsageError(f"{path}: TFRecord data CRC mismatch at record {n}")
        out.append(record)
        pos = end + 4
    return out


def write_tfrecord(path: str | Path, records: Iterable[bytes]) -> None:
    """Write records with TFRecord framing (for tests and exports)."""
    with open(path, "wb") as fh:
        for rec in records:
            header = struct.pack("<Q", len(rec))
            fh.write(header + struct.pack("<I", _masked_crc(header)) + rec + struct.pack("<I", _masked_crc(rec)))


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError("truncated fixed64")
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("truncated fixed32")
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, wire, value


def _decode_feature(buf: bytes) -> tuple[str, Any]:
    kind, values = "none", None
    for field, wire, value in _fields(buf):
        if field == 1 and wire == 2:  # BytesList
            kind, values = "bytes", [v for f, w, v in _fields(value) if f == 1 and w == 2]
        elif field == 2 and wire == 2:  # FloatList
            parts: list[np.ndarray] = []
            for f, w, v in _fields(value):
                if f != 1:
                    continue
                if w == 2:  # packed
                    if len(v) % 4:
                        raise ValueError("packed float list length is not a multiple of 4")
                    parts.append(np.frombuffer(v, dtype="<f4"))
                elif w == 5:
                    parts.append(np.frombuffer(v, dtype="<f4"))
            kind = "float"
            values = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
        elif field == 3 and wire == 2:  # Int64List
            ints: list[int] = []
            for f, w, v in _fields(value):
                if f != 1:
                    continue
                if w == 2:
                    p = 0
                    while p < len(v):
                        x, p = _varint(v, p)
                        ints.append(x - (1 << 64) if x >= 1 << 63 else x)
                elif w == 0:
                    ints.append(v - (1 << 64) if v >= 1 << 63 else v)
            kind, values = "int64", np.array(ints, dtype=np.int64)
    return kind, values


def decode_example(data: bytes) -> dict[str, tuple[str, Any]]:
    """Decode a serialized ``tf.train.Example``.

    Returns
    -------
    dict
        feature name -> (kind, values): ``("float", float32 array)``,
        ``("int64", int64 array)``, ``("bytes", list of bytes)`` or ``("none", None)``.

    Raises
    ------
    ValueError
        On malformed protobuf data.
    """
    out: dict[str, tuple[str, Any]] = {}
    for field, wire, features in _fields(data):
        if field != 1 or wire != 2:
            continue
        for f, w, entry in _fields(features):
            if f != 1 or w != 2:
                continue
            name, feature = "", b""
            for ef, ew, ev in _fields(entry):
                if ef == 1 and ew == 2:
                    name = ev.decode("utf-8")
                elif ef == 2 and ew == 2:
                    feature = ev
            out[name] = _decode_feature(feature)
    return out


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _enc_varint(field << 3 | 2) + _enc_varint(len(payload)) + payload


def encode_example(features: dict[str, Any]) -> bytes:
    """Serialize a ``tf.train.Example`` (floats packed; bytes; int64 packed).

    ``features`` maps names to a float array (FloatList), a list of bytes (BytesList)
    or an integer array (Int64List).
    """
    entries = b""
    for name, value in features.items():
        if isinstance(value, (list, tuple)) and (not value or isinstance(value[0], bytes)):
            inner = b"".join(_ld(1, v) for v in value)
            feature = _ld(1, inner)
        else:
            arr = np.asarray(value)
            if arr.dtype.kind == "f":
                feature = _ld(2, _ld(1, arr.astype("<f4").tobytes()) if arr.size else b"")
            elif arr.dtype.kind in "iu":
                packed = b"".join(_enc_varint(int(x) & 0xFFFFFFFFFFFFFFFF) for x in arr.ravel())
                feature = _ld(3, _ld(1, packed) if arr.size else b"")
            else:
                raise UsageError(f"cannot encode feature {name!r} of dtype {arr.dtype}")
        entries += _ld(1, _ld(1, name.encode("utf-8")) + _ld(2, feature))
    return _ld(1, entries)


# =========================================================================================
# Sources
# =========================================================================================
def _detect_format(path: Path) -> str:
    if path.is_dir():
        if next(path.rglob("*.tfrecord"), None) is not None:
            return "tfrecord"
        raise UsageError(f"{path} is a folder without .tfrecord files; pass --format (one of {', '.join(FORMATS)})")
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the format of {path.name} from its suffix; pass --format (one of {', '.join(FORMATS)})")
    return fmt


def _read_ids_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"id list {path} does not exist") from None
    ids = [line.strip() for line in lines]
    while ids and not ids[-1]:
        ids.pop()
    empty = [i + 1 for i, x in enumerate(ids) if not x]
    if empty:
        raise UsageError(f"id list {path} has empty lines ({', '.join(map(str, empty[:5]))}); one id per line")
    return ids


def _matrix_items(ids: Sequence[str], matrix: Any, where: str) -> Iterator[SourceItem]:
    n = matrix.shape[0]
    if len(ids) != n:
        raise UsageError(f"{where}: {len(ids)} ids but {n} vectors; they must be in the same order and number")
    for start in range(0, n, _SLICE):
        block = np.asarray(matrix[start : start + _SLICE])
        for i, row in enumerate(block):
            yield SourceItem(str(ids[start + i]), row, where=where)


def _decode_ids(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel().tolist()]


def _iter_npz(path: Path, ids_key: str | None, vectors_key: str | None) -> Iterator[SourceItem]:
    with np.load(path, allow_pickle=False) as z:
        if ids_key or vectors_key:
            missing = [k for k in (ids_key, vectors_key) if k is None or k not in z.files]
            if missing:
                raise UsageError(f"{path.name}: give both --ids-key and --vectors-key naming arrays of: {', '.join(z.files)}")
            yield from _matrix_items(_decode_ids(z[ids_key]), z[vectors_key], path.name)
            return
        for key in z.files:
            try:
                yield SourceItem(key, np.asarray(z[key]), where=path.name)
            except ValueError as exc:  # an object array needs pickle: refused
                yield SourceItem(key, None, f"cannot read array: {exc}", path.name)


def _iter_npy(path: Path, ids: Path | None) -> Iterator[SourceItem]:
    if ids is None:
        raise UsageError("--format npy needs --ids: a text file with one image id per line, in the array's row order")
    matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    if matrix.ndim < 2:
        raise UsageError(f"{path.name}: expected an (n, dim) array, got shape {matrix.shape}")
    yield from _matrix_items(_read_ids_file(ids), matrix, path.name)


def _iter_h5(path: Path, ids_key: str, vectors_key: str) -> Iterator[SourceItem]:
    import h5py

    with h5py.File(path, "r") as f:
        names: list[str] = []
        f.visit(lambda name: names.append(name) if isinstance(f[name], h5py.Dataset) else None)
        missing = [k for k in (ids_key, vectors_key) if k not in names]
        if missing:
            raise UsageError(
                f"{path.name}: dataset(s) {', '.join(missing)} not found; datasets are: {', '.join(names) or 'none'} "
                "(name them with --ids-key / --vectors-key)"
            )
        vecs = f[vectors_key]
        if vecs.ndim < 2:
            raise UsageError(f"{path.name}: dataset {vectors_key} has shape {vecs.shape}; expected (n, dim)")
        yield from _matrix_items(_decode_ids(f[ids_key][()]), vecs, path.name)


def _iter_parquet(path: Path, id_column: str, vector_column: str | None) -> Iterator[SourceItem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    names = schema.names
    if id_column not in names:
        raise UsageError(f"{path.name}: id column {id_column!r} not found; columns are: {', '.join(names)} (--id-column)")
    list_cols = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type) or pa.types.is_large_list(f.type)]
    if vector_column is not None:
        if vector_column not in names:
            raise UsageError(f"{path.name}: vector column {vector_column!r} not found; columns are: {', '.join(names)}")
        columns = [vector_column]
    elif len(list_cols) == 1:
        columns = list_cols
    elif len(list_cols) > 1:
        raise UsageError(f"{path.name}: several list columns ({', '.join(list_cols)}); name one with --vector-column")
    else:
        columns = [f.name for f in schema if f.name != id_column and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]
        if not columns:
            raise UsageError(f"{path.name}: no vector column: need a list column or numeric columns beside {id_column!r}")
    for batch in pf.iter_batches(batch_size=_SLICE, columns=[id_column, *columns]):
        ids = [str(x) if x is not None else "" for x in batch.column(0).to_pylist()]
        if len(columns) == 1 and columns[0] in list_cols or (len(columns) == 1 and vector_column is not None):
            col = batch.column(1)
            fast = _list_matrix(col)
            if fast is not None:
                for i, row in zip(ids, fast):
                    yield SourceItem(i, row, where=path.name)
                continue
            rows = col.to_pylist()
            for i, row in zip(ids, rows):
                if row is None:
                    yield SourceItem(i, None, "vector is null", path.name)
                else:
                    yield SourceItem(i, np.array([np.nan if v is None else v for v in row], dtype=np.float32), where=path.name)
        else:
            mat = np.column_stack(
                [batch.column(k).to_numpy(zero_copy_only=False).astype(np.float32) for k in range(1, batch.num_columns)]
            )
            for i, row in zip(ids, mat):
                yield SourceItem(i, row, where=path.name)


def _list_matrix(col: Any) -> np.ndarray | None:
    """A list column as an (n, L) float32 matrix, when no row or value is null and all
    rows have the same length; None otherwise (the caller goes row by row)."""
    import pyarrow as pa

    n = len(col)
    if n == 0 or col.null_count or not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        return None
    values = col.flatten()
    if values.null_count or not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        return None
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    else:
        offsets = np.asarray(col.offsets)
        lengths = np.diff(offsets)
        if lengths.size == 0 or (lengths != lengths[0]).any():
            return None
        width = int(lengths[0])
    if values.type != pa.float32():
        values = values.cast(pa.float32())
    return values.to_numpy(zero_copy_only=False).reshape(n, width)


def _iter_tfrecord(path: Path, feature: str) -> Iterator[SourceItem]:
    files = sorted(path.rglob("*.tfrecord")) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"{path}: no .tfrecord files found")
    for f in files:
        where = f.relative_to(path).as_posix() if path.is_dir() else f.name
        image_id = f.name[: -len(".tfrecord")] if f.name.endswith(".tfrecord") else f.stem
        try:
            records = read_tfrecord(f)
        except (UsageError, OSError) as exc:
            yield SourceItem(image_id, None, str(exc), where)
            continue
        if len(records) != 1:
            yield SourceItem(image_id, None, f"expected one tf.Example per file, found {len(records)}", where)
            continue
        try:
            feats = decode_example(records[0])
        except (ValueError, UnicodeDecodeError) as exc:
            yield SourceItem(image_id, None, f"malformed tf.Example: {exc}", where)
            continue
        if feature not in feats:
            yield SourceItem(image_id, None, f"no feature {feature!r}; features: {', '.join(sorted(feats)) or 'none'}", where)
        elif feats[feature][0] != "float":
            yield SourceItem(image_id, None, f"feature {feature!r} is a {feats[feature][0]} list, not a float list", where)
        else:
            yield SourceItem(image_id, feats[feature][1], where=where)


def iter_source(
    path: str | Path,
    *,
    format: Format | None = None,
    ids: str | Path | None = None,
    ids_key: str | None = None,
    vectors_key: str | None = None,
    id_column: str = "image_id",
    vector_column: str | None = None,
    feature: str = "embedding",
) -> Iterator[SourceItem]:
    """Stream ``(image_id, vector)`` items from a source file (see the module docs).

    Raises
    ------
    UsageError
        If the file is missing, the format unknown, or the file does not have the
        structure asked for (the message lists what it has).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"vectors source {p} does not exist")
    fmt = format or _detect_format(p)
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != "tfrecord" and p.is_dir():
        raise UsageError(f"{p} is a folder; format {fmt} reads one file")
    try:
        if fmt == "npz":
            yield from _iter_npz(p, ids_key, vectors_key)
        elif fmt == "npy":
            yield from _iter_npy(p, Path(ids) if ids is not None else None)
        elif fmt == "h5":
            yield from _iter_h5(p, ids_key or "ids", vectors_key or "embeddings")
        elif fmt == "parquet":
            yield from _iter_parquet(p, id_column, vector_column)
        else:
            yield from _iter_tfrecord(p, feature)
    except CxrStoreError:
        raise
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {p.name} as {fmt}: {exc}") from None


# =========================================================================================
# Import into a store
# =========================================================================================
@dataclasses.dataclass
class ImportReport:
    """What an import did."""

    run_id: str
    store: str
    model: str
    source: str
    format: str
    dim: int = 0
    native_shape: list[int] = dataclasses.field(default_factory=list)
    total: int = 0
    added: int = 0
    filled: int = 0
    skipped: int = 0
    failed: int = 0
    unmatched: int = 0
    unmatched_examples: list[str] = dataclasses.field(default_factory=list)
    manifest_without_vector: int = 0
    manifest_without_vector_examples: list[str] = dataclasses.field(default_factory=list)
    known_id_example: str = ""
    seconds: float = 0.0
    commits: int = 0
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self, *, max_failures: int = 100) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["seconds"] = round(self.seconds, 3)
        out["failures"] = self.failures[:max_failures]
        return out


def _check_shape(dim: int | None, native_shape: Sequence[int] | None) -> tuple[int | None, tuple[int, ...] | None]:
    shape = None
    if native_shape is not None:
        shape = tuple(int(s) for s in native_shape)
        if not shape or any(s < 1 for s in shape):
            raise UsageError(f"native shape {list(native_shape)} must be positive sizes, e.g. 32,768")
    if dim is not None:
        if isinstance(dim, bool) or int(dim) < 1:
            raise UsageError(f"dim must be a positive integer, not {dim!r}")
        dim = int(dim)
        if shape is not None and int(np.prod(shape)) != dim:
            raise UsageError(f"native shape {list(shape)} has {int(np.prod(shape))} values, not the declared dim {dim}")
    elif shape is not None:
        dim = int(np.prod(shape))
    return dim, shape


def _decide_shape(first: np.ndarray | None, dim: int | None, shape: tuple[int, ...] | None) -> tuple[int, tuple[int, ...]]:
    if dim is not None:
        if shape is None:
            own = _own_shape(first) if first is not None else None
            shape = own if own is not None and int(np.prod(own)) == dim and len(own) > 1 else KNOWN_SHAPES.get(dim, (dim,))
        return dim, shape
    if first is None:
        raise UsageError("the source holds no readable vector, and no --dim was declared")
    own = _own_shape(first)
    size = int(np.prod(own))
    if len(own) > 1:
        return size, own
    if size not in KNOWN_SHAPES:
        known = ", ".join(f"{k} ({'x'.join(map(str, v))})" for k, v in KNOWN_SHAPES.items())
        raise UsageError(f"vectors have {size} values, not a known size ({known}); declare it with --dim {size}")
    return size, KNOWN_SHAPES[size]


def _own_shape(v: np.ndarray) -> tuple[int, ...]:
    shape = tuple(int(s) for s in np.shape(v))
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape or (1,)


def import_vectors(
    store: str | Path,
    source: str | Path,
    *,
    model: str,
    format: Format | None = None,
    dim: int | None = None,
    native_shape: Sequence[int] | None = None,
    manifest: str | Path | None = None,
    root: str | Path | None = None,
    records: Iterable[ImageRecord | RecordError] | None = None,
    ids: str | Path | None = None,
    ids_key: str | None = None,
    vectors_key: str | None = None,
    id_column: str = "image_id",
    vector_column: str | None = None,
    feature: str = "embedding",
    source_model: str = "",
    manifest_id_column: str = "image_id",
    manifest_path_column: str = "path",
    dataset_name: str = "csv",
    strip_suffix: str = "",
    add_suffix: str = "",
    dtype: str = "float32",
    commit_every: int = 8192,
) -> ImportReport:
    """Import precomputed vectors into ``store`` under ``model`` (see the module docs).

    Parameters
    ----------
    store : str or Path
        The store folder (created if absent).
    source : str or Path
        The vectors file (a folder for per-image ``.tfrecord`` files).
    model : str
        Model name in the store.
    format : {"npz", "npy", "h5", "parquet", "tfrecord"}, optional
        Default: from the suffix (a folder: tfrecord).
    dim : int, optional
        Expected values per vector; default: the first vector's, if a known size.
    native_shape : sequence of int, optional
        The matrix each vector flattens (e.g. ``(32, 768)``); recorded in provenance.
    manifest, root : path, optional
        A CSV manifest (as for ``cxrstore ingest``) whose rows are created for ids that
        have no row yet; ``root`` as there (only used to check paths).
    records : iterable, optional
        Instead of ``manifest``: records from any dataset adapter.
    ids, ids_key, vectors_key, id_column, vector_column, feature
        Format options (see the module docs).
    source_model : str
        Free text naming the model that made the vectors (e.g. ``"elixr-v2 img_emb"``),
        recorded in the provenance.
    manifest_id_column, manifest_path_column, dataset_name
        Passed to the CSV manifest reader.
    strip_suffix, add_suffix : str
        Applied to every source id before matching (in this order), e.g.
        ``add_suffix=".png"`` when the source names NIH images ``00000001_000`` and the
        store ``00000001_000.png``. Recorded in the provenance.
    dtype : {"float32", "float16"}
        Storage dtype of a new model.
    commit_every : int
        Commit once this many vectors are staged.

    Returns
    -------
    ImportReport

    Raises
    ------
    UsageError
        Bad options, unreadable source, an unknown vector size without ``dim``.
    ProvenanceError
        If ``model`` exists with another source or shape.
    """
    started = time.perf_counter()
    src = Path(source)
    dim, shape = _check_shape(dim, native_shape)
    if commit_every < 1:
        raise UsageError(f"commit_every must be positive, got {commit_every}")
    items = iter_source(
        src, format=format, ids=ids, ids_key=ids_key, vectors_key=vectors_key,
        id_column=id_column, vector_column=vector_column, feature=feature,
    )
    fmt = format or _detect_format(src)
    # peek at the first readable vector to settle dim and native shape
    head: list[SourceItem] = []
    first: np.ndarray | None = None
    for item in items:
        head.append(item)
        if item.vector is not None:
            first = item.vector
            break
    dim, shape = _decide_shape(first, dim, shape)
    stream = itertools.chain(head, items)

    params: dict[str, Any] = {
        "format": fmt,
        "source": src.name,
        "source_sha256": weights_sha256(src),
        "source_model": source_model,
    }
    if strip_suffix or add_suffix:
        params["strip_suffix"] = strip_suffix
        params["add_suffix"] = add_suffix
    if fmt == "npy" and ids is not None:
        params["ids_file"] = Path(ids).name
        params["ids_sha256"] = weights_sha256(ids)
    if fmt in ("npz", "h5") and (ids_key or vectors_key or fmt == "h5"):
        params["ids_key"] = ids_key or "ids"
        params["vectors_key"] = vectors_key or "embeddings"
    if fmt == "parquet":
        params["id_column"] = id_column
        params["vector_column"] = vector_column
    if fmt == "tfrecord":
        params["feature"] = feature
    provenance = {
        "encoder": {"encoder": "precomputed", "version": "1", "params": params, "weights_sha256": None},
        "native_shape": list(shape),
        "preprocess": {"max_side": None, "source": "external"},
        "cxrstore_version": __version__,
        "created_at": _now(),
    }
    report = ImportReport(
        run_id=uuid.uuid4().hex[:12], store=str(store), model=model, source=str(src), format=fmt, dim=dim, native_shape=list(shape)
    )

    manifest_records: dict[str, ImageRecord] = {}
    manifest_errors: list[RecordError] = []
    if manifest is not None and records is not None:
        raise UsageError("give either manifest= or records=, not both")
    if manifest is not None:
        from cxrstore.datasets.csv_manifest import CsvManifest

        records = CsvManifest(
            manifest, root=root, id_column=manifest_id_column, path_column=manifest_path_column, dataset_name=dataset_name
        ).records()
    for rec in records or ():
        if isinstance(rec, RecordError):
            manifest_errors.append(rec)
        elif rec.variant == "original" or not rec.variant:
            manifest_records.setdefault(rec.image_id, rec)

    with open_writer(store) as writer:
        writer.ensure_model(model, provenance, dim=dim, dtype=dtype)
        n_committed = writer.store.n_rows
        present = writer.present_mask(model)
        keys = writer.keys()
        for err in manifest_errors:
            _fail(writer, report, err.image_id, err.path, model, f"manifest: {err.message()}")
        seen: set[str] = set()
        done: set[str] = set()  # ids whose row holds (or will hold) a vector of the model
        pending_rows: list[int] = []
        pending_vecs: list[np.ndarray] = []

        def flush() -> None:
            if pending_rows:
                writer.add_vectors(model, pending_rows, np.stack(pending_vecs))
                pending_rows.clear()
                pending_vecs.clear()

        for item in stream:
            report.total += 1
            iid = item.image_id
            if strip_suffix and iid.endswith(strip_suffix):
                iid = iid[: -len(strip_suffix)]
            if iid and add_suffix:
                iid += add_suffix
            if not iid:
                _fail(writer, report, "", item.where, model, "empty image id")
                continue
            if iid in seen:
                _fail(writer, report, iid, item.where, model, "duplicate id in the source; the first vector is kept")
                continue
            seen.add(iid)
            if item.vector is None:
                _fail(writer, report, iid, item.where, model, item.error or "no vector")
                continue
            vec = np.asarray(item.vector, dtype=np.float32).reshape(-1)
            if vec.size != dim:
                _fail(writer, report, iid, item.where, model, f"vector has {vec.size} values, expected {dim} ({'x'.join(map(str, shape))})")
                continue
            if not np.isfinite(vec).all():
                bad = int((~np.isfinite(vec)).sum())
                _fail(writer, report, iid, item.where, model, f"vector holds {bad} NaN or infinite value(s); refused")
                continue
            row = keys.get((iid, "original"))
            if row is not None:
                if row < n_committed and present[row]:
                    report.skipped += 1
                    done.add(iid)
                    continue
                report.filled += 1
            elif iid in manifest_records:
                row = writer.add_row(manifest_records[iid].row_data(sha256=""))
                report.added += 1
            else:
                report.unmatched += 1
                if len(report.unmatched_examples) < _MAX_EXAMPLES:
                    report.unmatched_examples.append(iid)
                where = "the store or the manifest" if manifest_records or manifest is not None else "the store (give --manifest to create rows)"
                _fail(writer, report, iid, item.where, model, f"no row for this id in {where}")
                continue
            done.add(iid)
            pending_rows.append(row)
            pending_vecs.append(vec)
            if len(pending_rows) >= 1024:
                flush()
            if writer.staged_vectors >= commit_every:
                flush()
                writer.commit()
                report.commits += 1
                n_committed = writer.store.n_rows
                present = writer.present_mask(model)
        flush()
        missing = [i for i in manifest_records if i not in done]
        if report.unmatched:
            report.known_id_example = next(iter(manifest_records), "") or next((k[0] for k in keys), "")
        report.manifest_without_vector = len(missing)
        report.manifest_without_vector_examples = missing[:_MAX_EXAMPLES]
        report.seconds = time.perf_counter() - started
        summary = report.to_json(max_failures=0)
        writer.add_run({
            "run_id": report.run_id, "store": report.store, "model": model, "encoder": "precomputed",
            "total": report.total, "added": report.added, "filled": report.filled, "skipped": report.skipped,
            "failed": report.failed, "seconds": summary["seconds"], "images_per_second": 0.0, "commits": report.commits + 1,
            "failures": [], "policies": {"import": {k: summary[k] for k in ("source", "format", "unmatched", "manifest_without_vector")}},
            "finished_at": _now(),
        })
        writer.commit()
        report.commits += 1
    if report.unmatched:
        logger.warning(
            "%s: %d id(s) matched no row, e.g. %s (known ids look like %r; see strip_suffix / add_suffix)",
            src.name, report.unmatched, ", ".join(report.unmatched_examples[:3]), report.known_id_example,
        )
    return report


def _fail(writer: Any, report: ImportReport, image_id: str, path: str, model: str, reason: str) -> None:
    report.failed += 1
    if len(report.failures) < 10_000:
        report.failures.append({"image_id": image_id, "path": path, "reason": reason})
    writer.add_failure(image_id=image_id, path=path, model=model, reason=reason, run_id=report.run_id)
    logger.debug("%s %s: %s", image_id or "-", path, reason)


def demo_precomputed(
    store: str | Path,
    *,
    work_dir: str | Path,
    source_model: str = "baseline",
    model: str = "baseline-precomputed",
    native_shape: Sequence[int] = (8, 64),
) -> dict[str, Any]:
    """Demo of the import path and the views, on a store that already holds ``source_model``.

    Writes ``source_model``'s vectors of the original images to ``work_dir/precomputed.npz``
    keyed by image id (as a vectors file made elsewhere would be), imports it under
    ``model`` declaring ``native_shape`` (filling the existing rows), and reads it back
    through both views.

    Returns
    -------
    dict
        ``report`` (the import report, first failures only), ``identical`` (the flat view
        equals the source vectors), ``native_shape``, ``flat_dim`` and ``mean_dim`` (None
        when the shape has one axis), ``npz`` (the file written).
    """
    from cxrstore.store.store import Store

    st = Store(store)
    sel = st.select(model=source_model, where={"variant": "original"})
    ids = [str(i) for i in st.column("image_id", sel.rows)]
    vecs = sel.vectors()
    shape = tuple(int(s) for s in native_shape)
    if int(np.prod(shape)) != vecs.shape[1]:
        shape = (vecs.shape[1],)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    npz = work / "precomputed.npz"
    np.savez(npz, **dict(zip(ids, vecs.reshape(len(ids), *shape))))
    report = import_vectors(store, npz, model=model, native_shape=shape, source_model=f"cxrstore {source_model}")
    st = Store(store)
    back = st.select(model=model, rows=sel.rows)
    mean_dim = back.vectors(view="mean").shape[1] if len(shape) > 1 else None
    return {
        "report": report.to_json(max_failures=5),
        "identical": bool(np.array_equal(back.vectors(), vecs)),
        "native_shape": list(shape),
        "flat_dim": int(vecs.shape[1]),
        "mean_dim": mean_dim,
        "npz": str(npz),
    }
