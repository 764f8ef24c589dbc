"""Store format v1: names, layout and codecs, in one place.

A store is a folder::

    STORE/
      store.zarr/                 zarr v3 group: everything row-aligned (below)
      write.lock                  held (flock) by the one process writing
      indexes/, plots/            sidecar files of later commands

and the zarr group ``store.zarr`` holds::

    attrs["cxrstore"]             {format, format_version, created_by, created_at, store_uuid}
    attrs["cxrstore_commit"]      the commit record (written last; see below)
    rows/<column>                 1-D, one entry per stored row: image_id, variant, source_row,
                                  dataset, patient_id, study_id, view, sex, age, path, sha256,
                                  generation, plus any extra string columns
    labels                        2-D int8 (rows x labels): 1, 0, or -1 for missing
    models/<name>/vectors         2-D float32/float16 (rows x dim), row-aligned
    models/<name>/present         1-D int32: generation that committed the row's vector, 0 = absent
    models/<name>.attrs           {"provenance": ...} (encoder config, native shape, preprocessing)
    failures/<column>             1-D: image_id, path, model, reason, run_id, generation

Commit protocol: a writer writes chunks for rows ``[n_rows, n_rows + b)`` (and fills
presence stamps for existing rows), then rewrites the root attributes with the new commit
record ``{generation, n_rows, n_failures, labels, columns, models}``. Every chunk and
metadata file is replaced atomically (zarr's LocalStore writes a temporary file and
renames it), so a reader that reads the commit record first and then only rows below
``n_rows`` and presence stamps at most ``generation`` sees exactly the committed state.
A writer that opens the store first rolls back anything a crashed writer left beyond
the commit (presence stamps above the committed generation, uncommitted models).

Every chunk carries a crc32c checksum (zarr's ``crc32c`` codec), so one flipped byte is
found by ``verify`` and named by array and chunk.
"""

from __future__ import annotations

from typing import Final

from zarr.codecs import BytesCodec, Crc32cCodec, VLenUTF8Codec, ZstdCodec

FORMAT_NAME: Final = "cxrstore.store"
FORMAT_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})

ZARR_DIR: Final = "store.zarr"
LOCK_FILE: Final = "write.lock"

ATTR_FORMAT: Final = "cxrstore"
ATTR_COMMIT: Final = "cxrstore_commit"

# Row metadata columns every store has, with their zarr dtype.
STR_COLUMNS: Final = (
    "image_id",
    "variant",
    "dataset",
    "patient_id",
    "study_id",
    "view",
    "sex",
    "path",
    "sha256",
)
NUMERIC_COLUMNS: Final = {"age": "float32", "source_row": "int64", "generation": "int32"}
FAILURE_COLUMNS: Final = ("image_id", "path", "model", "reason", "run_id")

LABEL_MISSING: Final = -1
ORIGINAL: Final = "original"

META_CHUNK_ROWS: Final = 16384
LABEL_CHUNK_COLS: Final = 32
TARGET_CHUNK_BYTES: Final = 4 * 1024 * 1024


def vector_chunk_rows(dim: int, itemsize: int) -> int:
    """Rows per vector chunk: the power of two that keeps a chunk near 4 MiB.

    Clamped to [16, 8192] rows, so a 24,576-wide ELIXR chunk holds 32 rows (3 MiB)
    and a 1024-wide one 1024 rows (4 MiB at float32).
    """
    rows = max(1, TARGET_CHUNK_BYTES // max(1, dim * itemsize))
    pow2 = 1 << (rows.bit_length() - 1)
    return int(min(8192, max(16, pow2)))


def vector_codecs() -> dict:
    """Codecs of vector arrays: raw little-endian floats plus a crc32c checksum.

    Embeddings compress poorly (zstd gave 1.08x on 1024-wide float32), so they are
    stored uncompressed and read at memory speed.
    """
    return {"serializer": BytesCodec(), "compressors": [Crc32cCodec()], "filters": None}


def numeric_codecs() -> dict:
    return {"serializer": BytesCodec(), "compressors": [ZstdCodec(level=3), Crc32cCodec()], "filters": None}


def string_codecs() -> dict:
    return {"serializer": VLenUTF8Codec(), "compressors": [ZstdCodec(level=3), Crc32cCodec()], "filters": None}
