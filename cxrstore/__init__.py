"""cxrstore: an embedding store for chest X-ray foundation-model embeddings."""

from __future__ import annotations

__version__ = "0.1.0"
