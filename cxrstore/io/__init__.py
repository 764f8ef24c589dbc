"""Reading pixels faithfully and the one uniform preprocessing step.

:func:`read_image` decodes DICOM, PNG and JPEG (detected by content) to a display-ready
grayscale :class:`RawImage`; :func:`preprocess` makes the canonical ``float32`` image in
``[0, 1]`` that every encoder builds on; :func:`load_canonical` does both.
"""

from __future__ import annotations

from cxrstore.io.preprocess import POLICY_VERSION, PreprocessConfig, load_canonical, preprocess, target_size
from cxrstore.io.read import (
    DEFAULT_MAX_PIXELS,
    RawImage,
    image_size,
    read_image,
    rgb_to_gray,
    sniff_format,
    window_to_unit,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "POLICY_VERSION",
    "PreprocessConfig",
    "RawImage",
    "image_size",
    "load_canonical",
    "preprocess",
    "read_image",
    "rgb_to_gray",
    "sniff_format",
    "target_size",
    "window_to_unit",
]
