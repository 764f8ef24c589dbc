"""The generic CSV manifest adapter (``--dataset csv``, the default).

A manifest is a CSV file with one row per image:

- required: an image id column (``image_id``) and a path column (``path``, relative to
  the root folder); other names through ``id_column`` / ``path_column``;
- optional canonical columns: ``dataset``, ``patient_id``, ``study_id``, ``view``,
  ``sex`` and ``age``;
- every other column is a label with values ``1``, ``0`` (``1.0``/``0.0`` accepted) or
  empty for missing, unless ``labels`` names the label columns: then the remaining
  columns are kept as extra string metadata.

Rows are refused one by one (and recorded as failures by the ingest): an empty or
duplicated id, a path outside the root, a label value other than 1, 0 or empty, an age
that is not a number.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from cxrstore.datasets.base import CANONICAL_COLUMNS, ImageRecord, RecordError, register_dataset, resolve_under_root
from cxrstore.errors import ManifestError, UsageError

_LABEL_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": None}
_SEX = {"f": "F", "female": "F", "m": "M", "male": "M", "o": "O", "other": "O", "": ""}


@register_dataset
class CsvManifest:
    """Images listed in a CSV manifest, under a root folder.

    Parameters
    ----------
    manifest : str or Path
        The CSV file.
    root : str or Path, optional
        Folder the paths are relative to; defaults to the manifest's folder.
    id_column, path_column : str
        Names of the required columns.
    labels : sequence of str, optional
        The label columns; default: every non-canonical column.
    dataset_name : str
        Value of the ``dataset`` column for rows whose manifest has none.
    """

    name: ClassVar[str] = "csv"

    def __init__(
        self,
        manifest: str | Path,
        *,
        root: str | Path | None = None,
        id_column: str = "image_id",
        path_column: str = "path",
        labels: Sequence[str] | None = None,
        dataset_name: str = "csv",
    ) -> None:
        self.manifest = Path(manifest)
        self.root = Path(root) if root is not None else self.manifest.parent
        if not self.root.is_dir():
            raise UsageError(f"root folder {self.root} does not exist or is not a folder")
        self.id_column = id_column
        self.path_column = path_column
        self.dataset_name = dataset_name
        try:
            self._df = pd.read_csv(self.manifest, dtype=str, keep_default_na=False, na_filter=False)
        except FileNotFoundError:
            raise ManifestError(f"{self.manifest}: manifest not found") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{self.manifest}: not a readable CSV manifest ({exc})") from None
        columns = list(self._df.columns)
        missing = [c for c in (id_column, path_column) if c not in columns]
        if missing:
            raise ManifestError(
                f"{self.manifest}: required column(s) {', '.join(missing)} not found; columns are: "
                f"{', '.join(columns)}. Name them with --id-column / --path-column"
            )
        rest = [c for c in columns if c not in (id_column, path_column, *CANONICAL_COLUMNS)]
        if labels is None:
            self.label_columns = rest
            self.extra_columns: list[str] = []
        else:
            unknown = [c for c in labels if c not in columns]
            if unknown:
                raise ManifestError(
                    f"{self.manifest}: label column(s) {', '.join(unknown)} not found; columns are: {', '.join(columns)}"
                )
            self.label_columns = list(labels)
            self.extra_columns = [c for c in rest if c not in self.label_columns]

    def __len__(self) -> int:
        return len(self._df)

    def policies(self) -> dict[str, Any]:
        return {
            "adapter": self.name,
            "manifest": str(self.manifest),
            "id_column": self.id_column,
            "path_column": self.path_column,
            "labels": list(self.label_columns),
            "label_values": "1 positive, 0 negative, empty missing",
        }

    def records(self) -> Iterator[ImageRecord | RecordError]:
        seen: set[str] = set()
        cols = list(self._df.columns)
        idx = {c: i for i, c in enumerate(cols)}
        for line, values in enumerate(self._df.itertuples(index=False, name=None), start=1):
            yield self._record(line, values, idx, seen)

    def _record(self, line: int, values: tuple[str, ...], idx: dict[str, int], seen: set[str]) -> ImageRecord | RecordError:
        def get(col: str) -> str:
            return values[idx[col]].strip() if col in idx else ""

        image_id, rel = get(self.id_column), get(self.path_column)
        if not image_id:
            return RecordError(f"empty {self.id_column}", path=rel, line=line)
        if image_id in seen:
            return RecordError(f"duplicate {self.id_column} {image_id!r}; the first row with it is kept", image_id, rel, line)
        seen.add(image_id)
        try:
            abs_path = resolve_under_root(self.root, rel)
        except UsageError as exc:
            return RecordError(str(exc), image_id, rel, line)
        labels: dict[str, float | None] = {}
        for col in self.label_columns:
            raw = get(col)
            if raw not in _LABEL_VALUES:
                return RecordError(f"label {col!r} has value {raw!r}; use 1, 0 or leave empty", image_id, rel, line)
            labels[col] = _LABEL_VALUES[raw]
        age: float | None = None
        if get("age"):
            try:
                age = float(get("age"))
            except ValueError:
                return RecordError(f"age {get('age')!r} is not a number", image_id, rel, line)
            if not math.isfinite(age) or age < 0:
                return RecordError(f"age {get('age')!r} is not a valid age", image_id, rel, line)
        sex = _SEX.get(get("sex").lower(), get("sex"))
        return ImageRecord(
            image_id=image_id,
            path=rel.replace("\\", "/"),
            abs_path=abs_path,
            dataset=get("dataset") or self.dataset_name,
            patient_id=get("patient_id"),
            study_id=get("study_id"),
            view=get("view").upper(),
            sex=sex,
            age=age,
            labels=labels,
            extra={c: get(c) for c in self.extra_columns},
            line=line,
        )
