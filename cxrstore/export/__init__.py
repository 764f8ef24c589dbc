"""Export fused vectors for downstream models.

- :mod:`cxrstore.export.fusion`: several models' vectors per row, each optionally
  L2-normalised and reduced by a stored PCA, concatenated over a selection (:func:`fuse`,
  :func:`fit_pca`, :func:`load_pca`).
- :mod:`cxrstore.export.clinical`: join with a clinical table on patient or study id,
  optionally by nearest study date (:func:`join_clinical`).
- :mod:`cxrstore.export.writers`: NumPy ``.npz``, Parquet, HDF5 and AnnData ``.h5ad``
  files, all streamed (:func:`export`, :func:`read_export`).
- :mod:`cxrstore.export.torch_dataset`: a PyTorch dataset streaming fused vectors
  (imported on demand: PyTorch is optional).
"""

from __future__ import annotations

from cxrstore.export.clinical import ClinicalReport, join_clinical, read_clinical
from cxrstore.export.demo import export_demo
from cxrstore.export.fusion import (
    Fusion,
    PcaTransform,
    fit_pca,
    fuse,
    load_pca,
)
from cxrstore.export.writers import (
    FORMATS,
    Exported,
    ExportReport,
    export,
    find_graph,
    read_export,
)

__all__ = [
    "FORMATS",
    "ClinicalReport",
    "ExportReport",
    "Exported",
    "Fusion",
    "PcaTransform",
    "export",
    "export_demo",
    "find_graph",
    "fit_pca",
    "fuse",
    "join_clinical",
    "load_pca",
    "read_clinical",
    "read_export",
]
