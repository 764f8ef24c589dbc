"""The dataset adapter contract and registry.

An adapter reads a dataset's own files (a CSV manifest, MIMIC-CXR's metadata and label
files, NIH's label file...) and yields one :class:`ImageRecord` per image, with the
canonical columns every store row has, or one :class:`RecordError` per row it refuses
(the ingest records those as failures and goes on). Paths are relative to a root folder
the user names; nothing outside that root is ever read.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Protocol, runtime_checkable

from cxrstore.errors import UsageError
from cxrstore.store.format import ORIGINAL
from cxrstore.store.store import RowData

logger = logging.getLogger(__name__)

#: Canonical optional columns, beyond ``image_id`` and ``path``.
CANONICAL_COLUMNS = ("dataset", "patient_id", "study_id", "view", "sex", "age")
#: Extra columns the dataset adapters write: visit order, official split, label policy id.
FOLLOW_UP_COLUMN = "follow_up"
SPLIT_COLUMN = "split"
LABEL_POLICY_COLUMN = "label_policy"
#: How many examples a report keeps per issue.
REPORT_EXAMPLES = 5


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
    follow_up : int or None
        Order of the image's visit among its patient's visits (0 = first), where the
        dataset has it (NIH ``Follow-up #``; MIMIC-CXR: rank of the study by date and
        time within the subject). Stored in the extra column ``follow_up`` as a
        zero-padded string (``"0003"``), so that it sorts as text.
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
    follow_up: int | None = None

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
            extra=self._extra(),
        )

    def _extra(self) -> dict[str, str]:
        extra = dict(self.extra)
        if self.follow_up is not None:
            extra[FOLLOW_UP_COLUMN] = f"{int(self.follow_up):04d}"
        return extra


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


@dataclasses.dataclass
class DatasetIssue:
    """One kind of problem an adapter met: how many times, and the first examples."""

    kind: str
    message: str
    count: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "count": self.count, "examples": list(self.examples)}


@dataclasses.dataclass
class DatasetReport:
    """What a dataset adapter found while reading a dataset's own files.

    Nothing is dropped silently: every row or file the adapter did not turn into an
    image record (a missing optional file, an unknown column, a label row without an
    image, an image without labels, a view not kept, a bad value...) is counted here
    under an issue ``kind``, with the first :data:`REPORT_EXAMPLES` examples.

    Attributes
    ----------
    dataset : str
        The adapter name.
    files : dict
        Role (``labels``, ``metadata``, ``split``...) to the file read, or ``""`` when absent.
    counts : dict
        Rows read per file role, images found, records yielded.
    issues : list of DatasetIssue
    """

    dataset: str
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    issues: list[DatasetIssue] = dataclasses.field(default_factory=list)

    def add(self, kind: str, message: str, examples: Iterable[Any] = (), count: int | None = None) -> DatasetIssue | None:
        """Record ``count`` occurrences (default: the number of ``examples``); none recorded if 0."""
        ex = [str(e) for e in examples]
        n = len(ex) if count is None else int(count)
        if n <= 0:
            return None
        issue = DatasetIssue(kind, message, n, ex[:REPORT_EXAMPLES])
        self.issues.append(issue)
        return issue

    def issue(self, kind: str) -> DatasetIssue | None:
        """The first issue of ``kind``, or None."""
        return next((i for i in self.issues if i.kind == kind), None)

    def count(self, kind: str) -> int:
        return sum(i.count for i in self.issues if i.kind == kind)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "files": dict(self.files),
            "counts": dict(self.counts),
            "issues": [i.to_json() for i in self.issues],
        }

    def log(self, log: logging.Logger | None = None) -> None:
        """Log every issue as a warning (counts and first examples)."""
        log = log or logger
        for i in self.issues:
            log.warning("%s: %s: %d (e.g. %s)", self.dataset, i.message, i.count, ", ".join(i.examples) or "-")


class ScannedDataset:
    """Base of adapters that read their label files once, at construction.

    Subclasses set ``root`` and ``check_images``, fill ``self._records`` (records and
    refusals, in order) and ``self._report`` (a :class:`DatasetReport`), and say where
    their labels come from (:meth:`label_policy`, :meth:`label_sources`).
    """

    root: Path
    check_images: bool
    _records: list[ImageRecord | RecordError]
    _report: DatasetReport

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> Iterator[ImageRecord | RecordError]:
        yield from self._records

    def report(self) -> DatasetReport:
        """What was read, and every row or file not turned into a record (counts, examples)."""
        return self._report

    def label_policy(self) -> dict[str, Any]:
        """The policy that determines the labels (its id is stored with every row)."""
        raise NotImplementedError

    def label_sources(self) -> dict[str, str]:
        """Where each harmonised label comes from, in words."""
        raise NotImplementedError

    def policies(self) -> dict[str, Any]:
        """Everything in force, recorded with the run: the label policy and its id, root, options."""
        from cxrstore.datasets.labels import policy_id

        pol = self.label_policy()
        return {
            **pol,
            "label_policy_id": policy_id(pol),
            "root": str(self.root),
            "check_images": self.check_images,
            "labels": self.label_sources(),
        }


def take(items: Iterable[Any], n: int = REPORT_EXAMPLES) -> list[Any]:
    """The first ``n`` items of an iterable."""
    return list(itertools.islice(items, n))


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


def adapter_report(adapter: Any) -> DatasetReport | None:
    """The adapter's :class:`DatasetReport` if it has one (``adapter.report()``), else None."""
    fn = getattr(adapter, "report", None)
    return fn() if callable(fn) else None


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
    from cxrstore.datasets import csv_manifest, mimic, nih  # noqa: F401


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


def find_file(root: Path, names: Iterable[str]) -> Path | None:
    """The first of ``names`` (relative to ``root``) that is a file, or None."""
    for name in names:
        p = root / name
        if p.is_file():
            return p
    return None


def read_table(path: Path, *, role: str, names: list[str] | None = None) -> Any:
    """Read a CSV (plain or gzipped, by content) as strings: empty cells stay ``""``.

    Parameters
    ----------
    path : Path
    role : str
        What the file is (``"label file"``...), for messages.
    names : list of str, optional
        Column names to use instead of the header line (which is then skipped).

    Raises
    ------
    ManifestError
        If the file is missing, empty, not a CSV, or a data row has more fields than the header.
    """
    import warnings

    import pandas as pd

    from cxrstore.errors import ManifestError

    opts: dict[str, Any] = {"dtype": str, "keep_default_na": False, "na_filter": False, "compression": _compression(path)}
    if names is not None:
        opts.update(header=None, skiprows=1, names=names, index_col=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, **opts)
    except FileNotFoundError:
        raise ManifestError(f"{path}: {role} not found") from None
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{path}: {role} is empty") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError, OSError, EOFError, ValueError) as exc:
        raise ManifestError(f"{path}: {role} is not a readable CSV ({type(exc).__name__}: {exc})") from None


def _compression(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError:
        return None
    return "gzip" if magic == b"\x1f\x8b" else None


def read_header(path: Path, *, role: str) -> str:
    """The first line of a CSV (plain or gzipped), without its line ending."""
    import gzip

    from cxrstore.errors import ManifestError

    try:
        opener = gzip.open if _compression(path) == "gzip" else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:  # type: ignore[operator]
            line = fh.readline()
    except FileNotFoundError:
        raise ManifestError(f"{path}: {role} not found") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: {role} cannot be read ({exc})") from None
    if not line.strip():
        raise ManifestError(f"{path}: {role} is empty (no header line)")
    return line.rstrip("\r\n")
