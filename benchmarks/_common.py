"""What every benchmark shares: print its results as JSON, and write them to ``--out``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: Any, out: str | Path | None, *, echo: bool = True) -> None:
    """Print ``result`` as indented JSON (when ``echo``) and write it to ``out`` if given.

    Called with ``echo=False`` it only (re)writes the file, so a long run's partial
    results survive an interruption.
    """
    text = json.dumps(result, indent=2, default=_plain)
    if echo:
        print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists; anything else as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
