"""A SYNTHETIC chest X-ray data set for demos and tests.

Nothing here is real patient data. Every image is drawn from scratch with numpy
by :func:`render_image`, and :func:`generate_demo` writes a small data set of
such images with a manifest, so that the whole pipeline (ingest, encoders,
search, clustering, probes) can be run and tested without downloading anything.

What is drawn
-------------
Each image is a frontal (PA or AP) "radiograph" built as a sum of densities in
a patient coordinate frame (so that it can be shifted, scaled and rotated):
soft tissue of the torso, two dark lung fields (ellipses cut from below by the
domes of the hemidiaphragms), a bright mediastinum, heart, aortic knob and
spine between them, curved posterior and fainter anterior ribs, clavicles, a
bright abdomen under the diaphragm, breast shadows for female patients, smooth
low-frequency density variation (partly patient-specific), mottled lung
markings, a smooth exposure gradient and film noise. The density is mapped to
brightness with patient-specific exposure (brightness, contrast) and written
as 8-bit grayscale, white = dense.

Each patient has its own anatomy (body and lung size, position, rotation, heart
size, rib spacing and phase, exposure, texture); the images of one patient are
small jitters of it, so they resemble each other more than images of other
patients do. AP views have a magnified heart, higher clavicles, shallower
inspiration and more noise.

How findings are planted
------------------------
Each study carries four binary labels. A label that is present adds its
finding, with a severity drawn per study (mild findings are deliberately hard
to see against the anatomical and exposure variation):

``Effusion``
    Fluid fills the base of one or both lungs up to a level with a meniscus
    rising laterally: the costophrenic angle is blunted and the dome of the
    diaphragm disappears behind it.
``Edema``
    Bilateral perihilar ("bat wing") haze with a fuzzy texture, a diffuse
    increase of lung density and Kerley-B-like short lines at the lateral bases.
``Atelectasis``
    A wedge of increased density running from the hilum into the upper or lower
    lobe of one lung, with volume loss: that hemidiaphragm is raised, the lung
    is shorter and the mediastinum shifts towards it.
``Opacity``
    One to three patchy, round-ish consolidations in the lung fields.

Each label has a prevalence of about 35 %. A patient's state for a label
persists from one study to the next with probability 0.75 (otherwise it is
redrawn), and the location of a patient's finding (side, lobe, blob positions)
is fixed per patient. Labels are drawn independently of each other. About 2 %
of the label cells of the manifest are left empty (unknown) on purpose.

Everything is deterministic given ``seed``: each patient and each image gets its
own generator derived from ``numpy.random.SeedSequence([seed, ...])``; no global
random state is used.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cxrstore.errors import UsageError

__all__ = [
    "LABELS",
    "MANIFEST_COLUMNS",
    "Anatomy",
    "Findings",
    "ImageParams",
    "generate_demo",
    "jitter_anatomy",
    "render_image",
    "sample_anatomy",
    "sample_findings",
]

#: The four labels of the demo data set, in manifest order.
LABELS: tuple[str, ...] = ("Atelectasis", "Edema", "Effusion", "Opacity")

#: The columns of ``manifest.csv``, in order.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id",
    "path",
    "patient_id",
    "study_id",
    "view",
    "sex",
    "age",
    *LABELS,
)

_PREVALENCE = 0.35
_PERSIST = 0.75
_MISSING = 0.02
_AP_FRACTION = 0.15
_TEX_N = 6  # coarse grid of the patient-specific density field


@dataclasses.dataclass(frozen=True, eq=False)
class Anatomy:
    """Geometry and exposure of one patient (or one image of that patient).

    Coordinates are in the patient frame: ``u`` to the image right, ``v``
    downwards, the image spanning about [-1, 1] in both before the frame's
    ``scale``, ``rot`` and ``(cx, cy)`` shift are applied. ``-1`` / ``+1`` as a
    side mean image left (the patient's right) / image right (patient's left).
    """

    sex: str
    age: int
    cx: float
    cy: float
    rot: float
    scale: float
    body_w: float
    lung_w: float
    lung_h: float
    lung_y: float
    med_w: float
    dome_base: tuple[float, float]  # (image-left, image-right) lateral dome level
    dome_h: float
    heart_x: float
    heart_w: float
    heart_h: float
    rib_spacing: float
    rib_phase: float
    rib_strength: float
    clav_y: float
    brightness: float
    contrast: float
    gradient: tuple[float, float]
    texture_amp: float
    texture: np.ndarray  # (_TEX_N, _TEX_N) coarse density field, float32
    noise: float


@dataclasses.dataclass(frozen=True)
class Findings:
    """Planted findings of one image; a severity of 0 means absent.

    Attributes
    ----------
    effusion, edema, atelectasis, opacity : float
        Severities in [0, 1].
    effusion_sides : tuple of int
        Sides (-1 image left, +1 image right) with fluid.
    atelectasis_side : int
        Side of the collapsed lobe.
    atelectasis_lobe : str
        ``"upper"`` or ``"lower"``.
    opacity_blobs : tuple of (side, a, b, radius)
        Consolidations: ``a``, ``b`` in [-1, 1] are the position inside the lung
        ellipse (fractions of its semi-axes), ``radius`` in patient units.
    """

    effusion: float = 0.0
    effusion_sides: tuple[int, ...] = (1,)
    edema: float = 0.0
    atelectasis: float = 0.0
    atelectasis_side: int = 1
    atelectasis_lobe: str = "lower"
    opacity: float = 0.0
    opacity_blobs: tuple[tuple[int, float, float, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class ImageParams:
    """Everything :func:`render_image` needs besides the noise generator."""

    anatomy: Anatomy
    findings: Findings = Findings()
    view: str = "PA"
    size: int = 512


# ----------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------


def sample_anatomy(rng: np.random.Generator, *, sex: str | None = None, age: int | None = None) -> Anatomy:
    """Draw the anatomy of a new patient.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    sex : {"F", "M"}, optional
        Drawn when not given.
    age : int, optional
        Drawn uniformly in [20, 90] when not given.
    """
    if sex is None:
        sex = "F" if rng.random() < 0.5 else "M"
    if sex not in ("F", "M"):
        raise UsageError(f"sex must be 'F' or 'M', not {sex!r}")
    if age is None:
        age = int(rng.integers(20, 91))
    size_f = 0.96 if sex == "F" else 1.03
    old = (age - 20) / 70.0
    base = float(rng.uniform(0.36, 0.44))
    return Anatomy(
        sex=sex,
        age=int(age),
        cx=float(rng.normal(0.0, 0.04)),
        cy=float(rng.normal(0.0, 0.04)),
        rot=float(np.deg2rad(rng.normal(0.0, 3.0))),
        scale=float(size_f * rng.uniform(0.88, 1.06)),
        body_w=float(rng.uniform(0.93, 1.04)),
        lung_w=float(rng.uniform(0.28, 0.34)),
        lung_h=float(rng.uniform(0.56, 0.64)),
        lung_y=float(rng.uniform(-0.12, -0.05)),
        med_w=float(rng.uniform(0.06, 0.09)),
        dome_base=(base - float(rng.uniform(0.0, 0.05)), base),
        dome_h=float(rng.uniform(0.10, 0.16)),
        heart_x=float(rng.uniform(0.08, 0.14)),
        heart_w=float(rng.uniform(0.30, 0.37)),
        heart_h=float(rng.uniform(0.22, 0.27)),
        rib_spacing=float(rng.uniform(0.105, 0.135)),
        rib_phase=float(rng.uniform(0.0, 1.0)),
        rib_strength=float(rng.uniform(0.07, 0.11) * (1.0 - 0.35 * old)),
        clav_y=float(rng.uniform(-0.70, -0.60)),
        brightness=float(rng.uniform(-0.07, 0.07)),
        contrast=float(rng.uniform(0.85, 1.15)),
        gradient=(float(rng.normal(0.0, 0.03)), float(rng.normal(0.0, 0.03))),
        texture_amp=float(rng.uniform(0.02, 0.05)),
        texture=rng.standard_normal((_TEX_N, _TEX_N)).astype(np.float32),
        noise=float(rng.uniform(0.012, 0.03)),
    )


def jitter_anatomy(a: Anatomy, rng: np.random.Generator, *, view: str = "PA") -> Anatomy:
    """A new image of the same patient: small changes of pose, inspiration and exposure.

    ``view="AP"`` also magnifies the heart, raises the clavicles, makes
    inspiration shallower and the image noisier.
    """
    if view not in ("PA", "AP"):
        raise UsageError(f"view must be 'PA' or 'AP', not {view!r}")
    insp = float(rng.normal(1.0, 0.025))
    ap = view == "AP"
    return dataclasses.replace(
        a,
        cx=a.cx + float(rng.normal(0.0, 0.012)),
        cy=a.cy + float(rng.normal(0.0, 0.012)),
        rot=a.rot + float(np.deg2rad(rng.normal(0.0, 0.8))),
        scale=a.scale * float(rng.normal(1.0, 0.015)),
        lung_h=a.lung_h * insp * (0.94 if ap else 1.0),
        dome_base=(
            a.dome_base[0] + (insp - 1.0) * 0.5 - (0.03 if ap else 0.0),
            a.dome_base[1] + (insp - 1.0) * 0.5 - (0.03 if ap else 0.0),
        ),
        heart_w=a.heart_w * (1.13 if ap else 1.0),
        heart_h=a.heart_h * (1.08 if ap else 1.0),
        clav_y=a.clav_y + (-0.07 if ap else 0.0) + float(rng.normal(0.0, 0.01)),
        brightness=a.brightness + float(rng.normal(0.0, 0.015)) + (0.03 if ap else 0.0),
        contrast=a.contrast * float(rng.normal(1.0, 0.03)),
        noise=a.noise * (1.3 if ap else 1.0),
    )


@dataclasses.dataclass(frozen=True)
class _Template:
    """Where a patient's findings sit (fixed per patient)."""

    effusion_sides: tuple[int, ...]
    atelectasis_side: int
    atelectasis_lobe: str
    opacity_blobs: tuple[tuple[int, float, float, float], ...]
    severity: tuple[float, float, float, float]  # base severity per label (LABELS order)


def _sample_template(rng: np.random.Generator) -> _Template:
    r = rng.random()
    eff_sides: tuple[int, ...] = (-1, 1) if r < 0.35 else ((-1,) if r < 0.675 else (1,))
    blobs = []
    for _ in range(int(rng.integers(2, 5))):
        blobs.append(
            (
                int(rng.choice([-1, 1])),
                float(rng.uniform(-0.55, 0.55)),
                float(rng.uniform(-0.6, 0.45)),
                float(rng.uniform(0.11, 0.20)),
            )
        )
    sev = tuple(float(s) for s in rng.uniform(0.25, 1.0, size=4))
    return _Template(
        effusion_sides=eff_sides,
        atelectasis_side=int(rng.choice([-1, 1])),
        atelectasis_lobe="lower" if rng.random() < 0.65 else "upper",
        opacity_blobs=tuple(blobs),
        severity=sev,  # type: ignore[arg-type]
    )


def sample_findings(
    labels: dict[str, int], rng: np.random.Generator, template: _Template | None = None
) -> Findings:
    """Findings for a study with the given labels (1 = present).

    Parameters
    ----------
    labels : dict
        Label name (see :data:`LABELS`) to 0/1; missing names count as 0.
    rng : numpy.random.Generator
        Source of randomness (severity jitter; location when no template).
    template : optional
        A patient's finding template (location and base severity); drawn from
        ``rng`` when not given.
    """
    t = template if template is not None else _sample_template(rng)
    sev = {}
    for name, base in zip(LABELS, t.severity):
        s = float(np.clip(base * rng.uniform(0.75, 1.15), 0.1, 1.0))
        sev[name] = s if labels.get(name, 0) else 0.0
    return Findings(
        effusion=sev["Effusion"],
        effusion_sides=t.effusion_sides,
        edema=sev["Edema"],
        atelectasis=sev["Atelectasis"],
        atelectasis_side=t.atelectasis_side,
        atelectasis_lobe=t.atelectasis_lobe,
        opacity=sev["Opacity"],
        opacity_blobs=t.opacity_blobs,
    )


# ----------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------


_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


def _ramp(z: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place: a cheap soft mask from a signed distance / edge ratio.

    ``z`` must be a temporary (it is overwritten); ``np.clip`` is avoided
    because it is several times slower than two in-place ufuncs.
    """
    z = np.asarray(z)
    if z.ndim == 0:
        return np.minimum(np.maximum(z, _ZERO), _ONE)
    np.maximum(z, _ZERO, out=z)
    np.minimum(z, _ONE, out=z)
    return z


def _clip(z: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """In-place float32 clip of a temporary array (see :func:`_ramp`)."""
    np.maximum(z, np.float32(lo), out=z)
    np.minimum(z, np.float32(hi), out=z)
    return z


def _interp_matrix(n_fine: int, n_coarse: int) -> np.ndarray:
    """(n_fine, n_coarse) matrix of linear interpolation weights."""
    pos = (np.arange(n_fine, dtype=np.float64) + 0.5) / n_fine * (n_coarse - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_coarse - 2)
    frac = pos - lo
    m = np.zeros((n_fine, n_coarse), dtype=np.float64)
    rows = np.arange(n_fine)
    m[rows, lo] = 1.0 - frac
    m[rows, lo + 1] = frac
    return m.astype(np.float32)


def _smooth_field(coarse: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small square field to ``(size, size)``."""
    m = _interp_matrix(size, coarse.shape[0])
    return (m @ coarse.astype(np.float32) @ m.T).astype(np.float32)


def render_image(params: ImageParams, rng: np.random.Generator) -> np.ndarray:
    """Draw one synthetic frontal chest radiograph.

    Parameters
    ----------
    params : ImageParams
        Anatomy, findings, view and output size.
    rng : numpy.random.Generator
        Source of the image's own randomness (texture, noise).

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` uint8, white = dense.
    """
    size = int(params.size)
    if size < 16:
        raise UsageError(f"image size must be at least 16, not {size}")
    a = params.anatomy
    f = params.findings
    f32 = np.float32

    # --- volume loss from atelectasis changes the geometry -------------------
    base = list(a.dome_base)
    lung_h = [a.lung_h, a.lung_h]
    shift = 0.0
    if f.atelectasis > 0:
        k = 0 if f.atelectasis_side < 0 else 1
        e = f.atelectasis
        base[k] -= (0.09 if f.atelectasis_lobe == "lower" else 0.05) * e
        lung_h[k] *= 1.0 - 0.06 * e
        shift = f.atelectasis_side * 0.05 * e

    # --- patient frame ---------------------------------------------------------
    t = ((np.arange(size, dtype=f32) + f32(0.5)) / f32(size) * f32(2.0) - f32(1.0)).astype(f32)
    xx = t[None, :] - f32(a.cx)
    yy = t[:, None] - f32(a.cy)
    c, s = f32(np.cos(a.rot) / a.scale), f32(np.sin(a.rot) / a.scale)
    U = (xx * c + yy * s).astype(f32)
    V = (yy * c - xx * s).astype(f32)
    AU = np.abs(U)
    px = 2.0 / size / a.scale  # one pixel in patient units
    edge = max(0.02, 1.5 * px)

    D = np.zeros((size, size), dtype=f32)

    # torso soft tissue: neck, rounded shoulders, chest wall
    sh = _ramp((V + f32(1.0)) / f32(0.35))
    bw = f32(a.body_w) * (f32(0.3) + f32(0.7) * sh * (f32(2.0) - sh))
    body = _ramp((bw - AU) / f32(0.08))
    D += f32(0.42) * body

    # lungs and diaphragm
    lungs = []
    thx = []
    domes = []
    for k, side in enumerate((-1, 1)):
        lx = side * (a.med_w + a.lung_w) + 0.5 * shift
        du = (U - f32(lx)) / f32(a.lung_w)
        lh = lung_h[k]
        ly = a.lung_y + (a.lung_h - lh)
        dv = (V - f32(ly)) / f32(lh)
        r2 = du * du + dv * dv  # (1 - r) ~ (1 - r^2) / 2 near the border
        ell = _ramp((f32(1.0) - r2) * f32(0.5 * a.lung_w / edge))
        wl = _clip(du * f32(side), -1.0, 1.0)  # -1 medial .. +1 lateral
        dome = f32(base[k]) - f32(a.dome_h) * (f32(1.0) - wl * wl) + f32(0.04) * np.minimum(wl, 0)
        lungs.append(ell * _ramp((dome - V) / f32(edge)))
        thx.append(_ramp((f32(1.25) - r2) * f32(2.0)) * _ramp((dome + f32(0.06) - V) / f32(0.06)))
        domes.append(dome)
    # the heart displaces the medial lung (its silhouette replaces the air)
    hx = a.heart_x + shift
    hy = 0.5 * (base[0] + base[1]) - a.dome_h - 0.45 * a.heart_h
    hr = ((U - f32(hx)) / f32(a.heart_w)) ** 2 + ((V - f32(hy)) / f32(a.heart_h)) ** 2
    heart = _ramp((f32(1.0) - hr) / f32(0.25))
    keep = f32(1.0) - f32(0.9) * heart
    lungs = [lungs[0] * keep, lungs[1] * keep]
    lung = lungs[0] + lungs[1]
    D -= f32(0.30) * lung
    dome_all = np.where(U < f32(shift), domes[0], domes[1])
    D += f32(0.10) * _ramp((V - dome_all) / f32(0.05)) * body

    # mediastinum, spine, heart, aortic knob
    D += f32(0.10) * _ramp((f32(a.med_w * 0.9) - np.abs(U - f32(shift))) / f32(0.03)) * _ramp(
        (f32(0.3) - V) / f32(0.2)
    )
    spine = _ramp((f32(0.05) - AU) / f32(0.012))
    D += spine * (f32(0.06) + f32(0.02) * np.cos(V * f32(2 * np.pi / 0.085)))
    D += f32(0.06) * heart
    kr = (U - f32(0.1 + shift)) ** 2 + (V - f32(a.lung_y - 0.18)) ** 2
    D += f32(0.08) * _ramp((f32(0.055**2) - kr) / f32(0.0015))

    # posterior (curving down laterally) and fainter anterior ribs over the thorax
    thorax = thx[0] + thx[1]
    ph = (V + f32(0.45) - f32(0.30) * AU - f32(0.55) * AU * AU) / f32(a.rib_spacing) + f32(a.rib_phase)
    rib = _ramp((np.cos(ph * f32(2 * np.pi)) - f32(0.35)) / f32(0.65))
    ph2 = (V + f32(0.1) + f32(0.35) * AU) / f32(a.rib_spacing * 1.35) + f32(a.rib_phase * 0.7)
    rib2 = _ramp((np.cos(ph2 * f32(2 * np.pi)) - f32(0.5)) / f32(0.5))
    D += f32(a.rib_strength) * (rib + f32(0.35) * rib2) * thorax * _ramp((AU - f32(0.04)) / f32(0.03))

    # clavicles
    dcl = np.abs(V - (f32(a.clav_y) - f32(0.14) * (AU - f32(0.05)) + f32(0.3) * (AU - f32(0.3)) ** 2))
    clav = _ramp((f32(0.028) - dcl) / f32(0.012)) * _ramp((AU - f32(0.05)) / f32(0.03)) * _ramp(
        (f32(0.58) - AU) / f32(0.05)
    )
    D += f32(0.15) * clav

    # breast shadows
    if a.sex == "F":
        br = ((AU - f32(a.med_w + a.lung_w * 1.3)) / f32(0.23)) ** 2 + ((V - f32(0.33)) / f32(0.16)) ** 2
        D += f32(0.045) * _ramp((f32(1.0) - br) / f32(1.2))

    # --- findings ---------------------------------------------------------------
    # the findings below only change the lungs: work inside their bounding box
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    if rows.size:
        box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    else:
        box = (slice(0, 0), slice(0, 0))
    Ub, Vb, AUb, lungb, Db = U[box], V[box], AU[box], lung[box], D[box]

    if f.effusion > 0:
        e = f.effusion
        for side in f.effusion_sides:
            k = 0 if side < 0 else 1
            lx = side * (a.med_w + a.lung_w) + 0.5 * shift
            wpos = _clip((Ub - f32(lx)) * f32(side / a.lung_w), 0.0, 1.0)
            h = 0.06 + 0.24 * e
            yf = f32(base[k] - h) - f32(0.05 + 0.08 * e) * wpos * wpos
            fluid = _ramp((Vb - yf) / f32(0.05))
            Db += f32(0.30) * fluid * lungs[k][box]

    if f.edema > 0:
        e = f.edema
        hd = ((AUb - f32(a.med_w + 0.07)) / f32(0.26)) ** 2 + ((Vb - f32(a.lung_y + 0.02)) / f32(0.3)) ** 2
        haze = np.exp(-hd)
        fuzz = _smooth_field(rng.standard_normal((24, 24)).astype(f32), size)[box]
        Db += lungb * (f32(0.12 * e) * haze * (f32(1.0) + f32(0.6) * fuzz) + f32(0.035 * e))
        # Kerley-B-like lines at the lateral bases
        lat = _ramp((AUb - f32(a.med_w + 1.55 * a.lung_w)) / f32(0.05)) * _ramp(
            (Vb - f32(max(base) - 0.22)) / f32(0.06)
        )
        kl = _ramp((np.cos(Vb * f32(2 * np.pi / 0.028)) - f32(0.75)) / f32(0.25))
        Db += f32(0.06 * e) * kl * lat * lungb

    if f.atelectasis > 0:
        e = f.atelectasis
        side = f.atelectasis_side
        k = 0 if side < 0 else 1
        hx0, hy0 = side * (a.med_w + 0.04) + shift, a.lung_y - 0.02
        if f.atelectasis_lobe == "lower":
            tx, ty = side * (a.med_w + 1.8 * a.lung_w), base[k] - 0.04
        else:
            tx, ty = side * (a.med_w + 1.7 * a.lung_w), a.lung_y - 0.42
        dx, dy = tx - hx0, ty - hy0
        ln = float(np.hypot(dx, dy))
        dx, dy = dx / ln, dy / ln
        along = ((Ub - f32(hx0)) * f32(dx) + (Vb - f32(hy0)) * f32(dy)) / f32(ln)
        perp = np.abs((Ub - f32(hx0)) * f32(-dy) + (Vb - f32(hy0)) * f32(dx))
        width = f32(0.03) + f32(0.10 + 0.05 * e) * _clip(along.copy(), 0.0, 1.0)
        wedge = _ramp((width - perp) / f32(0.04)) * _ramp(along / f32(0.1)) * _ramp((f32(1.1) - along) / f32(0.1))
        Db += f32(0.24 * (0.5 + 0.5 * e)) * wedge * lungs[k][box]

    if f.opacity > 0:
        e = f.opacity
        patch = _smooth_field(rng.standard_normal((20, 20)).astype(f32), size)
        for side, ba, bb, rad in f.opacity_blobs:
            k = 0 if side < 0 else 1
            uc = side * (a.med_w + a.lung_w) + 0.5 * shift + ba * a.lung_w
            vc = a.lung_y + bb * lung_h[k]
            rad = rad * (0.7 + 0.5 * e)
            # bounding box in pixels (rotation and scale of the frame)
            cr, sr = np.cos(a.rot), np.sin(a.rot)
            xc = a.cx + a.scale * (uc * cr - vc * sr)
            yc = a.cy + a.scale * (uc * sr + vc * cr)
            half = rad * a.scale * 1.2 + 2 * px * a.scale
            c0 = max(0, int(((xc - half) + 1) / 2 * size))
            c1 = min(size, int(((xc + half) + 1) / 2 * size) + 1)
            r0 = max(0, int(((yc - half) + 1) / 2 * size))
            r1 = min(size, int(((yc + half) + 1) / 2 * size) + 1)
            if c1 <= c0 or r1 <= r0:
                continue
            sl = (slice(r0, r1), slice(c0, c1))
            rr = ((U[sl] - f32(uc)) ** 2 + (V[sl] - f32(vc)) ** 2) / f32(rad * rad)
            prof = _ramp(f32(1.0) - rr)
            D[sl] += f32(0.34 * (0.65 + 0.35 * e)) * prof * (f32(0.7) + f32(0.3) * patch[sl]) * (
                _ramp(lung[sl] * f32(2.0)) * f32(0.8) + f32(0.2)
            )

    # --- texture, exposure, noise ----------------------------------------------
    D += f32(a.texture_amp) * _smooth_field(a.texture, size)
    D += f32(0.012) * _smooth_field(rng.standard_normal((8, 8)).astype(f32), size)
    D += f32(0.035) * lung * _smooth_field(rng.standard_normal((40, 40)).astype(f32), size)

    img = f32(0.06 + a.brightness) + f32(1.25 * a.contrast) * D
    img += f32(a.gradient[0]) * t[None, :] + f32(a.gradient[1]) * t[:, None]
    img += f32(a.noise) * rng.standard_normal((size, size), dtype=f32)
    _clip(img, 0.0, 1.0)
    return (img * f32(255.0) + f32(0.5)).astype(np.uint8)


# ----------------------------------------------------------------------------
# data set
# ----------------------------------------------------------------------------


def _check_range(name: str, value: Sequence[int], lo: int) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a (min, max) pair of integers, not {value!r}") from None
    if a < lo or b < a:
        raise UsageError(f"{name} must satisfy {lo} <= min <= max, not {value!r}")
    return a, b


def generate_demo(
    out_dir: str | os.PathLike[str],
    *,
    n_patients: int = 60,
    studies_per_patient: tuple[int, int] = (1, 4),
    images_per_study: tuple[int, int] = (1, 2),
    size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a SYNTHETIC chest X-ray data set with a manifest.

    Parameters
    ----------
    out_dir : path
        Created if needed. Images go to
        ``out_dir/images/p<patient>/s<study>/<image_id>.png`` (8-bit grayscale,
        ``size`` x ``size``), the manifest to ``out_dir/manifest.csv``.
    n_patients : int
        Number of patients (>= 1).
    studies_per_patient, images_per_study : (int, int)
        Inclusive ranges the counts are drawn from uniformly.
    size : int
        Side of the square images in pixels (>= 16).
    seed : int
        Non-negative seed; the same seed gives byte-identical files.

    Returns
    -------
    pathlib.Path
        Path of the manifest, with columns :data:`MANIFEST_COLUMNS`: ``image_id``
        (``demo-p0001-s01-i1``), ``path`` (relative to ``out_dir``),
        ``patient_id`` (``demo-p0001``), ``study_id`` (``demo-p0001-s01``),
        ``view`` (``PA``/``AP``), ``sex`` (``F``/``M``), ``age`` and the four
        labels as ``1``/``0`` or empty when unknown.
    """
    if isinstance(n_patients, bool) or not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise UsageError(f"n_patients must be a positive integer, not {n_patients!r}")
    s_lo, s_hi = _check_range("studies_per_patient", studies_per_patient, 1)
    i_lo, i_hi = _check_range("images_per_study", images_per_study, 1)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise UsageError(f"size must be an integer >= 16, not {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, not {seed!r}")
    seed = int(seed)
    size = int(size)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    for p in range(int(n_patients)):
        prng = np.random.default_rng(np.random.SeedSequence([seed, p]))
        anatomy = sample_anatomy(prng)
        template = _sample_template(prng)
        pid = f"p{p + 1:04d}"
        n_studies = int(prng.integers(s_lo, s_hi + 1))
        state = {name: int(prng.random() < _PREVALENCE) for name in LABELS}
        for st in range(n_studies):
            if st > 0:
                for name in LABELS:
                    if prng.random() >= _PERSIST:
                        state[name] = int(prng.random() < _PREVALENCE)
            labels = dict(state)
            view = "AP" if prng.random() < _AP_FRACTION else "PA"
            missing = {name: bool(prng.random() < _MISSING) for name in LABELS}
            findings = sample_findings(labels, prng, template)
            n_images = int(prng.integers(i_lo, i_hi + 1))
            sid = f"s{st + 1:02d}"
            folder = out / "images" / pid / sid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_images):
                irng = np.random.default_rng(np.random.SeedSequence([seed, p, st, i, 1]))
                params = ImageParams(
                    anatomy=jitter_anatomy(anatomy, irng, view=view),
                    findings=findings,
                    view=view,
                    size=size,
                )
                pixels = render_image(params, irng)
                image_id = f"demo-{pid}-{sid}-i{i + 1}"
                rel = f"images/{pid}/{sid}/{image_id}.png"
                Image.fromarray(pixels).save(out / rel, format="PNG")
                rows.append(
                    [
                        image_id,
                        rel,
                        f"demo-{pid}",
                        f"demo-{pid}-{sid}",
                        view,
                        anatomy.sex,
                        str(anatomy.age),
                        *("" if missing[name] else str(labels[name]) for name in LABELS),
                    ]
                )

    manifest = out / "manifest.csv"
    tmp = out / f".manifest.csv.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(rows)
        os.replace(tmp, manifest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return manifest
