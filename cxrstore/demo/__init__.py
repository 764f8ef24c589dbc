"""Synthetic demo data (see :mod:`cxrstore.demo.synth`)."""

from __future__ import annotations

from cxrstore.demo.synth import LABELS, MANIFEST_COLUMNS, generate_demo, render_image

__all__ = ["LABELS", "MANIFEST_COLUMNS", "generate_demo", "render_image"]
