"""The dataset adapter contract and registry.

An adapter reads a dataset's own files (a CSV manifest, MIMIC-CXR's metadata and label
files, NIH's label file...) and yields one :class:`ImageRecord` per image, with the
canonical columns every store row has, or one :class:`RecordError` per row it refuses
(the ingest records those as failures and goes on). Paths are relative to a root folder
the user names; nothing outside that root is ever read.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Protocol, runtime_checkable

from cxrstore.errors import UsageError
from cxrstore.store.format import ORIGINAL
from cxrstore.store.store import RowData

#: Canonical optional columns, beyond ``image_id`` and ``path``.
CANONICAL_COLUMNS = ("dataset", "patient_id", "study_id", "view", "sex", "age")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image to ingest, with its canonical metadata and labels.

    Attributes
    ----------
    image_id : str
        Unique within the dataset.
    path : str
        POSIX path relative to ``root``.
    abs_path : Path
        The resolved file, checked to lie inside ``root``.
    labels : mapping of str to float or None
        1.0, 0.0, or None for missing.
    line : int
        Where the record came from (1-based data line of the manifest), for messages.
    """

    image_id: str
    path: str
    abs_path: Path
    dataset: str = ""
    patient_id: str = ""
    study_id: str = ""
    view: str = ""
    sex: str = ""
    age: float | None = None
    labels: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)
    variant: str = ORIGINAL
    line: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.image_id, self.variant)

    def row_data(self, *, sha256: str, source_row: int = -1) -> RowData:
        """The store row for this record."""
        return RowData(
            image_id=self.image_id,
            path=self.path,
            sha256=sha256,
            dataset=self.dataset,
            variant=self.variant,
            source_row=source_row,
            patient_id=self.patient_id or self.image_id,
            study_id=self.study_id,
            view=self.view,
            sex=self.sex,
            age=math.nan if self.age is None else float(self.age),
            labels=dict(self.labels),
            extra=dict(self.extra),
        )


@dataclasses.dataclass(frozen=True)
class RecordError:
    """A manifest row the adapter refused: where, and why."""

    reason: str
    image_id: str = ""
    path: str = ""
    line: int = 0

    def message(self) -> str:
        where = f"line {self.line}" if self.line else "manifest"
        return f"{where}: {self.reason}"


@runtime_checkable
class DatasetAdapter(Protocol):
    """What ingest needs from a dataset adapter."""

    name: ClassVar[str]
    root: Path

    def records(self) -> Iterator[ImageRecord | RecordError]:
        """Every image of the dataset, or the reason a row was refused."""
        ...

    def policies(self) -> dict[str, Any]:
        """The options in force (label policy, columns...), recorded with the run."""
        ...


_REGISTRY: dict[str, type] = {}


def register_dataset(cls: type) -> type:
    """Class decorator: make an adapter available by its ``name``; duplicates refused."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise UsageError(f"dataset adapter {cls.__qualname__} has no string `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise UsageError(f"dataset adapter name {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls


def available_datasets() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_dataset(name: str, **options: Any) -> DatasetAdapter:
    """Instantiate a registered dataset adapter with its options."""
    _load_builtin()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    return cls(**options)


def _load_builtin() -> None:
    from cxrstore.datasets import csv_manifest  # noqa: F401


def resolve_under_root(root: Path, relative: str) -> Path:
    """Resolve ``relative`` inside ``root``, refusing anything that leaves it.

    Refused: an empty path, an absolute path, a path whose resolution (``..``
    components, or a symlink anywhere on the way) ends outside ``root``.

    Raises
    ------
    UsageError
        With the reason, for the caller to turn into a per-row failure.
    """
    if not relative or not relative.strip():
        raise UsageError("empty path")
    rel = relative.replace("\\", "/")
    if os.path.isabs(rel) or PurePosixPath(rel).is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        raise UsageError(f"absolute path {relative!r} refused: paths must be relative to the root folder")
    root_real = root.resolve()
    target = (root_real / rel).resolve()
    if not target.is_relative_to(root_real):
        raise UsageError(f"path {relative!r} resolves outside the root folder {root} and is refused")
    return target
