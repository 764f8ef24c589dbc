"""Ingest: read images, encode them once, and commit their vectors to the store.

The pipeline, per image: read the file's bytes (sha256), decode (:mod:`cxrstore.io`),
apply the uniform preprocessing, and run the encoder's ``prepare`` step, all in worker
processes; then the encoder's ``forward`` on batches in this process, and staged rows
committed every ``commit_every`` rows or ``commit_seconds`` seconds.

Three stages run at once so that the model never waits on the CPU: worker processes
decode ahead (up to ``4 x workers`` chunks in flight); ``forward`` runs in one
background thread (torch, TensorFlow and numpy release the GIL while they compute)
on batch *n* while the main thread collects batch *n + 1* from the workers and
writes the vectors of batch *n - 1* to the store. At most ``forward_depth`` batches
(default 2: one computing, one queued) wait on the model, and their results are
written in submission order, so a run stores the same rows in the same order as a
strictly sequential one. A commit covers the rows written so far; batches still with
the model are written after it and committed by the next.

Idempotent and resumable: a row is keyed by (image id, variant), and an image whose row
already holds a committed vector of the model is skipped without being read. Killed at
any point, a re-run continues where the last commit stopped. A file that cannot be read
becomes one failure record (file, reason) kept in the store; the run goes on.

Augmentation (``augment=``, :mod:`cxrstore.augment`): each requested variant of an image
is its own row (``variant`` = the variant name, ``source_row`` = the row of its original,
the same patient, study, labels and extra columns). The worker reads and decodes the file
once and prepares the original and every variant still missing; the original is always
stored (or already present) before its variants. The variants' parameters are recorded
in the run summary (``augment``), not in the model's provenance.

What a run records (``store.runs[i]``): the counts, the adapter's ``policies`` (with a
``label_policy_id`` that every row it produced also carries in its ``label_policy``
column, when the adapter sets one), the ``generations`` its commits spanned (rows it
added carry a ``generation`` in that range), the adapter's ``dataset_report`` and
``augment``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cxrstore import __version__
from cxrstore.augment import apply_variant, augment_record, parse_variants
from cxrstore.datasets.base import LABEL_POLICY_COLUMN, ImageRecord, RecordError
from cxrstore.encoders.base import Encoder
from cxrstore.errors import CxrStoreError, UsageError
from cxrstore.io.preprocess import PreprocessConfig, preprocess
from cxrstore.io.read import read_image
from cxrstore.store.format import ORIGINAL
from cxrstore.store.store import _now, open_writer

logger = logging.getLogger(__name__)

#: Files larger than this are refused before being read (a CXR DICOM is tens of MB).
MAX_FILE_BYTES = 1 << 30


@dataclasses.dataclass
class IngestReport:
    """What an ingest run did; ``to_json`` matches ``schemas/ingest-report.schema.json``."""

    run_id: str
    store: str
    model: str
    encoder: str
    total: int = 0
    added: int = 0
    filled: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    commits: int = 0
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    variants: list[str] = dataclasses.field(default_factory=list)
    dataset_report: dict[str, Any] | None = None
    label_policy_conflicts: int = 0

    @property
    def images_per_second(self) -> float:
        done = self.added + self.filled
        return done / self.seconds if self.seconds > 0 else 0.0

    def to_json(self, *, max_failures: int = 100) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "store": self.store,
            "model": self.model,
            "encoder": self.encoder,
            "total": self.total,
            "added": self.added,
            "filled": self.filled,
            "skipped": self.skipped,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "commits": self.commits,
            "failures": self.failures[:max_failures],
            **({"variants": list(self.variants)} if self.variants else {}),
            **({"dataset_report": self.dataset_report} if self.dataset_report is not None else {}),
            **({"label_policy_conflicts": self.label_policy_conflicts} if self.label_policy_conflicts else {}),
        }


# -- worker side -------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(preparer: Callable[[np.ndarray], np.ndarray], max_side: int) -> None:
    _WORKER["prepare"] = preparer
    _WORKER["max_side"] = max_side


Loaded = tuple[dict[str, np.ndarray] | None, str, str]


def load_one(
    path: str,
    preparer: Callable[[np.ndarray], np.ndarray],
    max_side: int,
    variants: Sequence[str] = (ORIGINAL,),
) -> Loaded:
    """Read, hash, decode and preprocess one file once; prepare each requested variant.

    Parameters
    ----------
    path : str
    preparer : callable
        The encoder's ``prepare`` step.
    max_side : int
        The uniform preprocessing's longest side.
    variants : sequence of str
        ``"original"`` and/or augmentation variant names (:mod:`cxrstore.augment`),
        each applied to the canonical image before ``preparer``.

    Returns
    -------
    prepared : dict of str to ndarray, or None
        The encoder's input per requested variant, or None on failure.
    sha256 : str
        Hex digest of the file's bytes ('' if unreadable).
    error : str
        Why it failed ('' on success).
    """
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            return None, "", f"file is {size} bytes, larger than the {MAX_FILE_BYTES} byte limit"
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None, "", "file not found"
    except IsADirectoryError:
        return None, "", "is a folder, not a file"
    except PermissionError:
        return None, "", "permission denied"
    except OSError as exc:
        return None, "", f"cannot read file: {exc.strerror or exc}"
    sha = hashlib.sha256(data).hexdigest()
    try:
        image = preprocess(read_image(data), max_side=max_side)
        prepared = {v: preparer(image if v == ORIGINAL else apply_variant(image, v)) for v in variants}
    except CxrStoreError as exc:
        return None, sha, getattr(exc, "reason", None) or str(exc)
    except (ValueError, TypeError, MemoryError) as exc:  # an encoder's prepare on odd input
        return None, sha, f"{type(exc).__name__}: {exc}"
    return prepared, sha, ""


def _load_many(items: Sequence[tuple[str, tuple[str, ...]]]) -> list[Loaded]:
    return [load_one(p, _WORKER["prepare"], _WORKER["max_side"], v) for p, v in items]


def _iter_loaded(
    paths: Sequence[tuple[str, tuple[str, ...]]],
    preparer: Callable[[np.ndarray], np.ndarray],
    max_side: int,
    workers: int,
    chunk: int,
) -> Iterator[Loaded]:
    """Results for ``(path, variants)`` items in order; at most ``4 * workers`` chunks in flight."""
    if workers <= 0:
        for p, v in paths:
            yield load_one(p, preparer, max_side, v)
        return
    ctx = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(preparer, max_side))
    inflight: collections.deque[Future[list[Loaded]]] = collections.deque()
    starts = iter(range(0, len(paths), chunk))
    try:
        for start in starts:
            inflight.append(executor.submit(_load_many, paths[start : start + chunk]))
            if len(inflight) >= 4 * workers:
                break
        while inflight:
            results = inflight.popleft().result()
            nxt = next(starts, None)
            if nxt is not None:
                inflight.append(executor.submit(_load_many, paths[nxt : nxt + chunk]))
            yield from results
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# -- main side ---------------------------------------------------------------------------
def model_provenance(encoder: Encoder, prep: PreprocessConfig) -> dict[str, Any]:
    """Everything that identifies how a model's vectors were made."""
    return {
        "encoder": encoder.config.to_json(),
        "native_shape": list(encoder.native_shape),
        "preprocess": prep.to_json(),
        "cxrstore_version": __version__,
        "created_at": _now(),
    }


def ingest(
    store: str | Path,
    records: Iterable[ImageRecord | RecordError],
    *,
    encoder: Encoder,
    model: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    commit_every: int = 1024,
    commit_seconds: float = 60.0,
    dtype: str = "float32",
    preprocess_config: PreprocessConfig | None = None,
    policies: dict[str, Any] | None = None,
    progress: bool = False,
    augment: str | Sequence[str] | bool | None = None,
    dataset_report: dict[str, Any] | None = None,
    forward_depth: int = 2,
) -> IngestReport:
    """Encode images into ``store`` (created if absent) under ``model``.

    Parameters
    ----------
    store : str or Path
        The store folder.
    records : iterable of ImageRecord or RecordError
        From a dataset adapter's ``records()``; errors become failure records.
    encoder : Encoder
        From :func:`cxrstore.encoders.base.get_encoder`.
    model : str, optional
        Name of the model in the store; defaults to the encoder's name.
    batch_size : int
        Images per ``forward`` call.
    workers : int, optional
        Decoding processes; default: the number of CPUs. 0 decodes in this process.
    commit_every : int
        Commit once this many rows have been staged (a crash loses at most these).
    commit_seconds : float
        Commit at least this often while work is staged.
    dtype : {"float32", "float16"}
        Storage dtype of a new model's vectors.
    preprocess_config : PreprocessConfig, optional
        The uniform preprocessing; recorded in the model's provenance.
    policies : dict, optional
        The adapter's options in force, recorded with the run summary.
    progress : bool
        Show a progress bar (rate and ETA) on stderr.
    augment : str, sequence of str or bool, optional
        Augmentation variants to store beside each original: ``"all"``/``True`` for the
        five, or names (``"brighter,rot+45"``); see :mod:`cxrstore.augment`.
    dataset_report : dict, optional
        The adapter's report (``DatasetReport.to_json()``), kept in the run summary.
    forward_depth : int
        Batches submitted to the encoder's background thread before the oldest one's
        vectors are written (2: the model computes one while the next waits). 0 runs
        ``forward`` in this thread, strictly in turn with decoding and writing.

    Returns
    -------
    IngestReport
        Counts of rows (an image and each of its variants count one row each) added,
        filled (new model on an existing row), skipped (already present) and failed
        (failure records: one per unreadable file, one per row refused), with the failures.
    """
    if batch_size < 1 or commit_every < 1:
        raise UsageError("batch_size and commit_every must be positive")
    if forward_depth < 0:
        raise UsageError(f"forward_depth must be 0 or more, got {forward_depth}")
    variants = parse_variants(augment)
    prep = preprocess_config or PreprocessConfig()
    model = model or encoder.name
    workers = (os.cpu_count() or 1) if workers is None else workers
    report = IngestReport(run_id=uuid.uuid4().hex[:12], store=str(store), model=model, encoder=encoder.name,
                          variants=list(variants), dataset_report=dataset_report)
    started = time.perf_counter()
    with open_writer(store) as writer:
        writer.ensure_model(model, model_provenance(encoder, prep), dim=encoder.dim, dtype=dtype)
        first_generation = writer.store.generation + 1
        n_committed = writer.store.n_rows
        present = writer.present_mask(model)
        stored_sha = writer.store.column("sha256") if n_committed else np.array([], dtype=object)
        stored_policy = (writer.store.column(LABEL_POLICY_COLUMN)
                         if n_committed and LABEL_POLICY_COLUMN in writer.store.columns else None)
        conflicts: list[str] = []
        keys = writer.keys()
        # Per image: the (variant, existing row) pairs still to encode; the original first.
        todo: list[tuple[ImageRecord, list[tuple[str, int | None]]]] = []
        for rec in records:
            if isinstance(rec, RecordError):
                report.total += 1
                _fail(writer, report, rec.image_id, rec.path, model, rec.message())
                continue
            wanted = (rec.variant, *variants) if rec.variant == ORIGINAL else (rec.variant,)
            need: list[tuple[str, int | None]] = []
            for v in wanted:
                report.total += 1
                row = keys.get((rec.image_id, v))
                if row is not None and stored_policy is not None and row < n_committed:
                    new_policy = rec.extra.get(LABEL_POLICY_COLUMN, "")
                    if new_policy and stored_policy[row] and new_policy != stored_policy[row]:
                        conflicts.append(f"{rec.image_id}/{v}")
                if row is not None and row < n_committed and present[row]:
                    report.skipped += 1
                    continue
                need.append((v, row))
            if need:
                todo.append((rec, need))
        if conflicts:
            report.label_policy_conflicts = len(conflicts)
            logger.warning(
                "%s: %d rows were stored earlier under another label policy; their labels are kept as stored "
                "(their label_policy column says which), e.g. %s", store, len(conflicts), ", ".join(conflicts[:5]))
        n_rows_todo = sum(len(need) for _, need in todo)
        logger.info("%s: %d rows to encode (%d images), %d already present", store, n_rows_todo, len(todo), report.skipped)
        bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True, desc=f"ingest {model}")
        batch: list[tuple[ImageRecord, str, int | None, np.ndarray, str]] = []
        failed_sources: set[str] = set()
        last_commit = time.monotonic()

        forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrstore-forward") if forward_depth else None
        pending: collections.deque[tuple[list[Any], Future[np.ndarray]]] = collections.deque()

        def flush() -> None:
            """Hand the gathered batch to the model; write the oldest result when enough wait."""
            if batch:
                done = list(batch)
                batch.clear()
                inputs = [b[3] for b in done]
                if forward_pool is None:
                    write(done, encoder.forward(inputs))
                else:
                    pending.append((done, forward_pool.submit(encoder.forward, inputs)))
            while len(pending) > forward_depth:
                done, fut = pending.popleft()
                write(done, fut.result())

        def drain() -> None:
            """Write every submitted batch (at the end of the run)."""
            flush()
            while pending:
                done, fut = pending.popleft()
                write(done, fut.result())

        def write(done: list[Any], out: np.ndarray) -> None:
            vecs = np.asarray(out, dtype=np.float32)
            if vecs.shape != (len(done), encoder.dim):
                raise CxrStoreError(
                    f"encoder {encoder.name!r} returned shape {vecs.shape} for {len(done)} images; "
                    f"expected ({len(done)}, {encoder.dim})"
                )
            rows: list[int] = []
            keep: list[int] = []
            for i, (rec, variant, row, _, sha) in enumerate(done):
                what = rec.image_id if variant == ORIGINAL else f"{rec.image_id} ({variant})"
                source_row = -1
                if variant != rec.variant:  # an augmentation of the record's image
                    src = writer.row_of(rec.image_id, rec.variant)
                    if src is None or rec.image_id in failed_sources:
                        _fail(writer, report, rec.image_id, rec.path, model,
                              f"variant {variant}: not stored because its original could not be stored")
                        continue
                    if src < n_committed and stored_sha[src] and stored_sha[src] != sha:
                        _fail(writer, report, rec.image_id, rec.path, model,
                              f"variant {variant}: file content changed since its original (row {src}) was stored "
                              "(sha256 differs); use a new image_id")
                        continue
                    source_row = src
                if not np.isfinite(vecs[i]).all():
                    if variant == rec.variant:
                        failed_sources.add(rec.image_id)
                    _fail(writer, report, rec.image_id, rec.path, model, f"{what}: the encoder returned NaN or infinite values")
                    continue
                if row is None:
                    data = (rec if variant == rec.variant else dataclasses.replace(rec, variant=variant))
                    row = writer.add_row(data.row_data(sha256=sha, source_row=source_row))
                    report.added += 1
                else:
                    if row < n_committed and stored_sha[row] and stored_sha[row] != sha:
                        if variant == rec.variant:
                            failed_sources.add(rec.image_id)
                        _fail(writer, report, rec.image_id, rec.path, model,
                              f"file content changed since row {row} was stored (sha256 differs); use a new image_id")
                        continue
                    report.filled += 1
                rows.append(row)
                keep.append(i)
            if rows:
                writer.add_vectors(model, rows, vecs[keep])

        items = [(str(rec.abs_path), tuple(v for v, _ in need)) for rec, need in todo]
        try:
            loaded = _iter_loaded(items, encoder.preparer(), prep.max_side, workers, chunk=max(1, min(16, batch_size)))
            for (rec, need), (prepared, sha, error) in zip(todo, loaded):
                bar.update(1)
                if prepared is None:
                    extra = f" (and its {len(need) - 1} variant rows)" if len(need) > 1 else ""
                    _fail(writer, report, rec.image_id, rec.path, model, error + extra)
                else:
                    for variant, row in need:
                        batch.append((rec, variant, row, prepared[variant], sha))
                    if len(batch) >= batch_size:
                        flush()
                staged = writer.staged_vectors
                if staged >= commit_every or (staged and time.monotonic() - last_commit > commit_seconds):
                    # commits what is written; batches still with the model stay in flight
                    writer.commit()
                    report.commits += 1
                    last_commit = time.monotonic()
            drain()
        finally:
            bar.close()
            if forward_pool is not None:
                forward_pool.shutdown(wait=True, cancel_futures=True)
        report.seconds = time.perf_counter() - started
        summary: dict[str, Any] = {
            **report.to_json(max_failures=0),
            "policies": policies or {},
            "generations": [first_generation, writer.store.generation + 1],
            "finished_at": _now(),
        }
        if variants:
            summary["augment"] = augment_record(variants)
        writer.add_run(summary)
        writer.commit()
        report.commits += 1
    return report


def _fail(writer: Any, report: IngestReport, image_id: str, path: str, model: str, reason: str) -> None:
    report.failed += 1
    report.failures.append({"image_id": image_id, "path": path, "reason": reason})
    writer.add_failure(image_id=image_id, path=path, model=model, reason=reason, run_id=report.run_id)
    logger.warning("%s %s: %s", image_id or "-", path, reason)


def ingest_dataset(
    store: str | Path,
    *,
    dataset: str = "csv",
    encoder: str | Encoder = "baseline",
    encoder_options: dict[str, Any] | None = None,
    dataset_options: dict[str, Any] | None = None,
    **options: Any,
) -> IngestReport:
    """Ingest a dataset by adapter name: the Python twin of ``cxrstore ingest``.

    Parameters
    ----------
    store : str or Path
        The store folder (created if absent).
    dataset : str
        Registered adapter name (``csv`` reads a manifest).
    encoder : str or Encoder
        Registered encoder name or an encoder instance.
    encoder_options, dataset_options : dict, optional
        Passed to the encoder and adapter constructors (e.g. ``manifest=``, ``root=``).
    **options
        Passed to :func:`ingest` (``model``, ``batch_size``, ``workers``, ``augment``...).

    The adapter's ``policies()`` and, when it has one, its ``report()`` (a
    :class:`~cxrstore.datasets.base.DatasetReport`: every row or file it did not turn into
    a record, with counts and first examples; already logged by the adapter) are kept in
    the run summary and returned on the report (``dataset_report``).

    Example
    -------
    >>> ingest_dataset("store", dataset="nih-cxr14",                       # doctest: +SKIP
    ...                dataset_options={"root": "/data/nih", "opacity_fallback": "missing"},
    ...                augment="all", workers=4)
    """
    from cxrstore.datasets.base import adapter_report, get_dataset
    from cxrstore.encoders.base import get_encoder

    adapter = get_dataset(dataset, **(dataset_options or {}))
    enc = get_encoder(encoder, **(encoder_options or {})) if isinstance(encoder, str) else encoder
    found = adapter_report(adapter)
    return ingest(store, adapter.records(), encoder=enc, policies=adapter.policies(),
                  dataset_report=found.to_json() if found is not None else None, **options)
