"""The harmonised label vocabulary and the label policies, loaded from data.

The mapping lives in ``schemas/labels-v1.json`` (validated by
``schemas/labels.schema.json``), not in code: each harmonised label names, per dataset,
its source column(s) and the rule that makes it 1, 0 or missing. A user changes a mapping
by editing a copy and passing it as ``label_map=`` (``--label-map`` on the CLI).

Policies (:class:`LabelPolicy`), chosen by the user and recorded with every row they
produced (see :func:`policy_id`):

``labeller`` (MIMIC-CXR)
    ``chexpert`` or ``negbio``: which label file is read.
``uncertain`` (MIMIC-CXR, value -1.0)
    ``exclude``: the label becomes missing for that image (the image stays, its other
    labels are unaffected); ``positive``: 1; ``negative``: 0.
``not_mentioned`` (MIMIC-CXR, empty cell)
    ``negative``: 0; ``missing``: missing. NIH ChestX-ray14 has no such state: a finding
    not listed is a negative.
``views``
    The view positions kept (default frontal ``PA`` and ``AP``); images with any other
    or no view are not ingested, and are counted in the adapter's report.
``opacity_fallback`` (NIH)
    For NIH images without the expert ``Airspace opacity`` label: one of the fallbacks
    the mapping lists for Opacity (default ``any-infiltration-consolidation-pneumonia``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from cxrstore.errors import ManifestError, UsageError

Labeller = Literal["chexpert", "negbio"]
Uncertain = Literal["exclude", "positive", "negative"]
NotMentioned = Literal["negative", "missing"]

LABELLERS: tuple[str, ...] = get_args(Labeller)
UNCERTAIN: tuple[str, ...] = get_args(Uncertain)
NOT_MENTIONED: tuple[str, ...] = get_args(NotMentioned)
DEFAULT_VIEWS: tuple[str, ...] = ("PA", "AP")
#: The study's four labels.
STUDY_LABELS: tuple[str, ...] = ("Atelectasis", "Edema", "Effusion", "Opacity")

_DEFAULT_MAP = "labels-v1.json"


def _choice(name: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise UsageError(f"{name} {value!r} is not valid; choose one of: {', '.join(valid)}")
    return value


def parse_views(views: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"PA,AP"`` or ``["PA", "AP"]`` to a tuple of upper-case view names (default PA, AP)."""
    if views is None:
        return DEFAULT_VIEWS
    items = views.split(",") if isinstance(views, str) else list(views)
    out = tuple(dict.fromkeys(v.strip().upper() for v in items if v.strip()))
    if not out:
        raise UsageError(f"views {views!r} names no view; give a comma-separated list such as PA,AP")
    return out


@dataclasses.dataclass(frozen=True)
class LabelPolicy:
    """The label policies in force; see the module docstring. Validated on creation."""

    labeller: str = "chexpert"
    uncertain: str = "exclude"
    not_mentioned: str = "negative"
    views: tuple[str, ...] = DEFAULT_VIEWS
    opacity_fallback: str | None = None

    def __post_init__(self) -> None:
        _choice("labeller", self.labeller, LABELLERS)
        _choice("uncertain policy", self.uncertain, UNCERTAIN)
        _choice("not-mentioned policy", self.not_mentioned, NOT_MENTIONED)
        object.__setattr__(self, "views", parse_views(self.views))


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """A validated harmonised label mapping.

    Attributes
    ----------
    doc : dict
        The mapping as loaded.
    source : str
        Where it came from (``"builtin:labels-v1.json"`` or a file path).
    sha256 : str
        sha256 of its canonical JSON: recorded with the rows it labelled.
    """

    doc: Mapping[str, Any]
    source: str
    sha256: str

    @property
    def names(self) -> list[str]:
        return [entry["name"] for entry in self.doc["labels"]]

    def for_dataset(self, dataset: str) -> list[tuple[str, dict[str, Any]]]:
        """``(harmonised name, source rule)`` of every label ``dataset`` has, in map order."""
        return [(e["name"], dict(e["sources"][dataset])) for e in self.doc["labels"] if dataset in e["sources"]]

    def summary(self) -> dict[str, Any]:
        return {"name": self.doc["name"], "version": self.doc["version"], "source": self.source, "sha256": self.sha256}


def load_label_map(path: str | Path | None = None) -> LabelMap:
    """Load and validate a label mapping: the built-in ``schemas/labels-v1.json`` by default.

    Raises
    ------
    ManifestError
        If the file is missing, not JSON, or does not match ``schemas/labels.schema.json``
        (the message lists the problems), or names a label twice.
    """
    from cxrstore.schemas import validate

    if path is None:
        text = resources.files("schemas").joinpath(_DEFAULT_MAP).read_text(encoding="utf-8")
        source = f"builtin:{_DEFAULT_MAP}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(f"{path}: label map not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: cannot read label map ({exc})") from None
        source = str(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{source}: label map is not valid JSON ({exc})") from None
    problems = validate(doc, "labels")
    if problems:
        raise ManifestError(f"{source}: label map does not match schemas/labels.schema.json: " + "; ".join(problems[:5]))
    names = [e["name"] for e in doc["labels"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"{source}: label(s) {', '.join(dupes)} defined more than once")
    for e in doc["labels"]:
        for ds, rule in e["sources"].items():
            if rule.get("rule") == "expert" and rule["default_fallback"] not in rule["fallbacks"]:
                raise ManifestError(
                    f"{source}: label {e['name']!r} ({ds}): default_fallback {rule['default_fallback']!r} is not one of "
                    f"its fallbacks ({', '.join(rule['fallbacks'])})"
                )
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return LabelMap(doc=doc, source=source, sha256=hashlib.sha256(canonical.encode()).hexdigest())


def policy_id(policy: Mapping[str, Any]) -> str:
    """A short, stable id of a label policy record: ``lp-`` and 12 hex digits.

    Stored per row in the ``label_policy`` metadata column; the full record is kept in
    the run summary (``store.runs[i]["policies"]``) under the same id.
    """
    canonical = json.dumps(policy, sort_keys=True, separators=(",", ":"), default=str)
    return "lp-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def policies_in_store(store: Any) -> list[dict[str, Any]]:
    """The label policies behind a store's rows: one entry per distinct ``label_policy``.

    Each entry: ``{"label_policy": id, "rows": n, "policies": {...} or None, "runs": [run ids]}``
    (``policies`` is ``None`` if no kept run summary holds that id; rows from adapters
    without a label policy, such as the CSV manifest, have the id ``""``).
    """
    import numpy as np

    if store.n_rows == 0:
        return []
    if "label_policy" in store.columns:
        values, counts = np.unique(store.column("label_policy").astype(str), return_counts=True)
    else:
        values, counts = np.array([""]), np.array([store.n_rows])
    by_id: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[str]] = {}
    for run in store.runs:
        pol = run.get("policies") or {}
        pid = pol.get("label_policy_id", "")
        if pid:
            by_id[pid] = pol  # the latest run wins (same id, same policy)
            runs.setdefault(pid, []).append(str(run.get("run_id", "")))
    if "" in values.tolist():
        for run in store.runs:
            pol = run.get("policies") or {}
            if not pol.get("label_policy_id"):
                by_id[""] = pol
    out = []
    for value, count in zip(values.tolist(), counts.tolist()):
        out.append({"label_policy": value, "rows": int(count), "policies": by_id.get(value), "runs": runs.get(value, [])})
    return out
