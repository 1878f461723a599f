"""
Synthetic left-atrium-like and prostate-like MRI volumes, written in every supported on-disk format.

The real data sets cannot be downloaded in tests or demos. These volumes share what matters to the method: a
blob-shaped foreground of varied shape, size, position and orientation that covers only some of the slices along
the last axis, varied contrast, Gaussian noise, a smooth multiplicative bias field, a textured background, and
unlabeled distractor structures of similar intensity, so that a model trained on a few labeled cases is clearly
imperfect. One generator serves both anatomies through a parameter set (:py:data:`ANATOMIES`).

For unit tests and micro-benchmarks of the 2D engines, :py:func:`synthetic_discs` makes small 2D images of one
bright disc in noise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..utils.io import atomic_write_text
from .formats import VolumeFormat, get_format

__all__ = ["AnatomyParams", "ANATOMIES", "synthetic_case", "synthetic_discs", "make_synthetic_dataset"]


@dataclass(frozen=True)
class AnatomyParams:
    """
    Parameters of one kind of synthetic anatomy. Lengths are fractions of the volume size along each axis
    (the generator works in normalised coordinates ``[-0.5, 0.5]^3``); ranges are ``(low, high)`` of uniform draws.

    Attributes:
        num_appendages: number of extra ellipsoids attached to the body (veins / appendage, or lobes).
        body_radius: in-plane radii of the body.
        body_depth: radius of the body along the last axis.
        flatten: ratio of the second in-plane radius to the first.
        appendage_radius: thickness of the appendages, relative to the body's in-plane radius.
        appendage_length: length of the appendages, relative to the body's in-plane radius.
        max_tilt: largest rotation angle (radians) of the ellipsoids about a random axis.
        center_range: range of the body centre in-plane (normalised, symmetric about 0).
        center_depth: range of the body centre along the last axis (normalised).
        num_distractors: number of unlabeled ellipsoids of similar intensity.
        tube_probability: probability of one extra unlabeled tube along the last axis (a vessel crossing all slices).
        contrast: range of the foreground's contrast-to-noise ratio (its level over the larger of the noise and
            texture amplitudes).
        distractor_contrast: range of the distractors' intensity relative to the foreground's.
        distractor_radius: range of the distractors' radii (normalised).
        adjacent_fraction: probability that a distractor touches the foreground.
        noise: range of the standard deviation of the Gaussian noise (before z-scoring; the textured background's
            amplitude is drawn from 0.15-0.35).
        pool_texture: the texture's amplitude inside the blood pools (the foreground and the distractors) relative
            to outside them; below 1 the pools are more uniform than the tissue around them, as contrast-enhanced
            blood is.
    """

    num_appendages: tuple[int, int]
    body_radius: tuple[float, float]
    body_depth: tuple[float, float]
    flatten: tuple[float, float]
    appendage_radius: tuple[float, float]
    appendage_length: tuple[float, float]
    max_tilt: float
    center_range: float
    center_depth: float
    num_distractors: tuple[int, int]
    tube_probability: float
    contrast: tuple[float, float] = (1.5, 3.5)
    distractor_contrast: tuple[float, float] = (0.8, 1.15)
    distractor_radius: tuple[float, float] = (0.05, 0.14)
    adjacent_fraction: float = 0.5
    noise: tuple[float, float] = (0.15, 0.35)
    pool_texture: float = 1.0


#: the anatomies of :py:func:`synthetic_case`: ``"la"`` (left atrium: a body with 0-3 vein-like appendages, any
#: orientation), ``"la_demo"`` (the demo's left atrium: the same generator with a larger, more central body in a
#: tighter crop, about 6% of the voxels instead of 2.5%, and 1-3 distractors of 0.6-1.0 times its intensity instead of
#: 2-4 of 0.8-1.15 times; with its bias field, texture and the tube, still not separable by intensity alone; and, like
#: the real UA-MT volumes, a body in nearly one pose, tilted by at most 0.3 rad, under half the pixel noise and half
#: the texture inside the blood pools) and
#: ``"prostate"`` (a flatter gland with at most one lobe, nearly upright, more central).
ANATOMIES: dict[str, AnatomyParams] = {
    "la": AnatomyParams(
        num_appendages=(0, 3),
        body_radius=(0.13, 0.23),
        body_depth=(0.2, 0.34),
        flatten=(0.6, 1.0),
        appendage_radius=(0.25, 0.45),
        appendage_length=(0.6, 1.1),
        max_tilt=np.pi,
        center_range=0.15,
        center_depth=0.06,
        num_distractors=(2, 4),
        tube_probability=0.8,
    ),
    "prostate": AnatomyParams(
        num_appendages=(0, 1),
        body_radius=(0.1, 0.17),
        body_depth=(0.18, 0.3),
        flatten=(0.55, 0.8),
        appendage_radius=(0.5, 0.7),
        appendage_length=(0.4, 0.7),
        max_tilt=0.4,
        center_range=0.08,
        center_depth=0.06,
        num_distractors=(1, 3),
        tube_probability=0.3,
    ),
}
#: the demo's left atrium: ``"la"`` with a larger, more central body and fewer, dimmer distractors, calibrated to three
#: statistics of the real UA-MT volumes (docs/results.md): their atria share a pose (the median absolute cosine
#: between the main axes of two training labels is 0.99; 0.74 for ``"la"``, 0.94 here), their per-pixel noise is
#: low (high-pass std of min-max scaled slices 0.022; 0.071 for ``"la"``, 0.028 here) and their blood pool is
#: uniform (the atrium's intensity std in min-max scaled slices 0.073; 0.102 with the texture of ``"la"`` inside the
#: pools, 0.075 here with half of it)
ANATOMIES["la_demo"] = replace(
    ANATOMIES["la"],
    body_radius=(0.2, 0.3),
    body_depth=(0.25, 0.38),
    center_range=0.1,
    num_distractors=(1, 3),
    distractor_contrast=(0.6, 1.0),
    noise=(0.04, 0.09),
    max_tilt=0.3,
    pool_texture=0.5,
)


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis) + 1e-12
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _ellipsoid(grid: list[np.ndarray], center: np.ndarray, radii: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """
    Boolean mask of ``|R^T (p - c) / r| <= 1``. ``grid`` holds the normalised coordinates of each axis; only the
    bounding box of the ellipsoid is evaluated.
    """
    shape = tuple(len(a) for a in grid)
    mask = np.zeros(shape, dtype=bool)
    half = np.sqrt(((rot * radii[None, :]) ** 2).sum(1))  # bounding box half-extent along each axis
    box = []
    for a, c, h in zip(grid, center, half):
        lo, hi = np.searchsorted(a, c - h, "left"), np.searchsorted(a, c + h, "right")
        if hi <= lo:
            return mask
        box.append(slice(int(lo), int(hi)))
    d = [
        (a[b] - c).astype(np.float32).reshape([-1 if i == k else 1 for i in range(3)])
        for k, (a, b, c) in enumerate(zip(grid, box, center))
    ]
    q = 0.0
    for k in range(3):  # k-th coordinate in the ellipsoid frame: (R^T d)_k / r_k
        qk = (d[0] * rot[0, k] + d[1] * rot[1, k] + d[2] * rot[2, k]) / radii[k]
        q = q + qk * qk
    mask[tuple(box)] = q <= 1.0
    return mask


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: int) -> np.ndarray:
    """Unit-variance smooth random field: Gaussian noise on a coarse grid of ``cells`` per axis, upsampled."""
    coarse = [max(2, min(int(s), cells)) for s in shape]
    noise = torch.from_numpy(rng.standard_normal(coarse).astype(np.float32))[None, None]
    field = F.interpolate(noise, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)[0, 0]
    field = field.numpy()
    return (field - field.mean()) / (field.std() + 1e-6)


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    return [(np.arange(s, dtype=np.float64) + 0.5) / s - 0.5 for s in shape]


def _foreground(rng: np.random.Generator, grid: list[np.ndarray], p: AnatomyParams) -> tuple[np.ndarray, np.ndarray]:
    center = np.array(
        [
            rng.uniform(-p.center_range, p.center_range),
            rng.uniform(-p.center_range, p.center_range),
            rng.uniform(-p.center_depth, p.center_depth),
        ]
    )
    r = rng.uniform(*p.body_radius)
    radii = np.array([r, r * rng.uniform(*p.flatten), rng.uniform(*p.body_depth)])
    rot = _rotation(rng, p.max_tilt)
    mask = _ellipsoid(grid, center, radii, rot)
    for _ in range(rng.integers(p.num_appendages[0], p.num_appendages[1] + 1)):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-12
        length = r * rng.uniform(*p.appendage_length)
        thick = r * rng.uniform(*p.appendage_radius)
        # centre on the body's surface along `direction` (in the body frame), pointing outwards
        surface = center + rot @ (direction * radii * 0.8)
        outward = rot @ (direction * radii)
        outward /= np.linalg.norm(outward) + 1e-12
        # rotation taking the x axis onto `outward`, then a random twist
        a = np.cross([1.0, 0.0, 0.0], outward)
        s, c = np.linalg.norm(a), float(outward[0])
        if s < 1e-8:
            align = np.eye(3) if c > 0 else np.diag([-1.0, -1.0, 1.0])
        else:
            k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]]) / s
            align = np.eye(3) + s * k + (1 - c) * (k @ k)
        app_rot = align @ _rotation(rng, 0.3)
        mask |= _ellipsoid(grid, surface + outward * length * 0.5, np.array([length, thick, thick]), app_rot)
    return mask, center


def synthetic_case(
    rng: np.random.Generator, shape: Sequence[int] = (96, 96, 48), kind: str = "la"
) -> tuple[np.ndarray, np.ndarray]:
    """
    One synthetic MRI volume and its foreground mask.

    The foreground is a union of randomly rotated ellipsoids (a body plus 0-3 appendages for ``"la"`` and
    ``"la_demo"``, a flatter gland with at most one lobe for ``"prostate"``) that spans only the middle slices along
    the last axis (at least the first and last ``max(1, 8%)`` slices are empty). The image has a textured
    background, 1-5 unlabeled structures of similar intensity (one often a tube through all slices; how many, how
    large and how bright is the anatomy's), a random foreground contrast, partial volume blur, a smooth
    multiplicative bias field and Gaussian noise, and is z-scored (like UA-MT's volumes).

    Args:
        rng: the random generator (all randomness comes from it).
        shape: spatial shape ``(H, W, D)``; each side at least 8.
        kind: a key of :py:data:`ANATOMIES`.

    Returns:
        ``(image, label)``: float32 ``[H, W, D]`` with mean 0 and standard deviation 1, uint8 ``[H, W, D]`` {0,1}.

    Raises:
        ValueError: for an unknown ``kind`` or a shape that is not 3D or too small.

    Example::

        image, label = synthetic_case(np.random.default_rng(0), shape=(64, 64, 32))
    """
    if kind not in ANATOMIES:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(ANATOMIES)}.")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes of at least 8, got {shape}.")
    p = ANATOMIES[kind]
    grid = _grid(shape)
    margin = max(1, round(0.08 * shape[2]))
    for _ in range(20):
        mask, center = _foreground(rng, grid, p)
        mask[..., :margin] = False
        mask[..., shape[2] - margin :] = False
        parts, n = ndimage.label(mask)
        if n > 1:  # a thin appendage may break up on the voxel grid: keep the largest piece, as real masks are
            mask = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1
        if mask.sum() >= 8:
            break
    distract = np.zeros(shape, dtype=bool)
    fg_voxels = np.argwhere(mask)
    for _ in range(rng.integers(p.num_distractors[0], p.num_distractors[1] + 1)):
        adjacent = rng.uniform() < p.adjacent_fraction  # touching the foreground (neighbouring chambers, vessels)
        for _attempt in range(5):
            radii = rng.uniform(*p.distractor_radius, size=3)
            if adjacent:
                v = fg_voxels[rng.integers(len(fg_voxels))]
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction) + 1e-12
                c = np.array([grid[k][v[k]] for k in range(3)]) + direction * radii.mean()
            else:
                c = rng.uniform(-0.35, 0.35, size=3)
            blob = _ellipsoid(grid, c, radii, _rotation(rng, np.pi))
            if (blob & mask).sum() <= (0.5 if adjacent else 0.1) * blob.sum():
                distract |= blob
                break
    if rng.uniform() < p.tube_probability:
        c = np.array([*rng.uniform(-0.38, 0.38, size=2), 0.0])
        radius = rng.uniform(0.04, 0.08)
        tube = _ellipsoid(grid, c, np.array([radius, radius * rng.uniform(0.7, 1.0), 2.0]), _rotation(rng, 0.25))
        distract |= tube & ~mask
    noise = rng.uniform(*p.noise)
    texture_amp = rng.uniform(0.15, 0.35)
    fg_level = rng.uniform(*p.contrast) * max(noise, texture_amp)  # contrast-to-noise ratio (1.5-3.5 for "la")
    fg = mask.astype(np.float32) * fg_level * (1 + 0.15 * _smooth_field(rng, shape, 6))
    other = (distract & ~mask).astype(np.float32) * fg_level * rng.uniform(*p.distractor_contrast)
    texture = texture_amp * (_smooth_field(rng, shape, 8) + 0.5 * _smooth_field(rng, shape, 20))
    if p.pool_texture != 1.0:
        pools = ndimage.gaussian_filter((mask | distract).astype(np.float32), sigma=1.0)
        texture = texture * (1.0 - (1.0 - p.pool_texture) * pools)
    content = ndimage.gaussian_filter(fg + other, sigma=rng.uniform(0.5, 1.0)) + texture + rng.uniform(0.5, 1.0)
    bias = np.exp(rng.uniform(0.1, 0.35) * _smooth_field(rng, shape, 3))
    image = content * bias + rng.normal(0.0, noise, size=shape)
    image = (image - image.mean()) / (image.std() + 1e-6)
    return image.astype(np.float32), mask.astype(np.uint8)


def synthetic_discs(
    n: int, size: int = 32, seed: int = 0, noise: float = 0.3, contrast: float = 0.8, jitter: bool = False
) -> list[dict]:
    """
    ``n`` small 2D samples of one bright disc of random centre and radius in Gaussian noise (a toy problem for
    engine tests and timing; :py:func:`synthetic_case` is the realistic generator).

    Args:
        n: number of samples.
        size: image side in pixels.
        seed: seed of the ``torch.Generator`` all randomness comes from.
        noise: standard deviation of the noise.
        contrast: intensity of the disc above the background.
        jitter: give every image a random gain (0.4-1.2) and offset (0-0.3).

    Returns:
        one dict per sample: ``image`` float32 ``[1, size, size]``, ``label`` its disc mask ``[1, size, size]``
        {0, 1}, and ``case_id`` ``"c<seed>_<i>"``.

    Example::

        samples = synthetic_discs(4, size=16, seed=1)
        samples[0]["image"].shape  # torch.Size([1, 16, 16])
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        c = torch.rand(2, generator=g) * 0.8 - 0.4
        r = 0.25 + 0.25 * torch.rand(1, generator=g)
        mask = (((xx - c[0]) ** 2 + (yy - c[1]) ** 2) < r**2).float()
        image = contrast * mask + noise * torch.randn(size, size, generator=g)
        if jitter:
            image = image * (0.4 + 0.8 * torch.rand(1, generator=g)) + 0.3 * torch.rand(1, generator=g)
        out.append({"image": image[None], "label": mask[None], "case_id": f"c{seed}_{i}"})
    return out


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    format: str | VolumeFormat = "uamt_h5",
    num_cases: int = 12,
    shape: Sequence[int] = (96, 96, 48),
    seed: int = 0,
    spacing: Sequence[float] | None = None,
    case_ids: Sequence[str] | None = None,
    kind: str | None = None,
) -> list[str]:
    """
    Write ``num_cases`` labeled synthetic cases in the layout of ``format``.

    The anatomy follows the format (left atrium for ``uamt_h5``, ``la_raw``, ``msd_heart``; prostate for
    ``promise12``, ``msd_prostate``) unless ``kind`` names one, and each case is written by :py:meth:`VolumeFormat.write
    <monai_mlbseg.data.formats.VolumeFormat.write>`. Case ``i`` depends only on ``(seed, i)``, so the data are
    deterministic and a larger data set extends a smaller one. For formats with ``case_lists`` (``uamt_h5``,
    ``la_raw``) also writes UA-MT style ``train.list`` and ``test.list`` (one case id per line; the last ~20% of the
    cases are the test cases).

    Args:
        out_dir: the data folder (created).
        format: a key of :py:data:`~monai_mlbseg.data.formats.FORMATS` or a ``VolumeFormat``.
        num_cases: number of cases (ignored when ``case_ids`` is given).
        shape: spatial shape of the volumes.
        seed: random seed.
        spacing: voxel spacing stored in the files; ``None``: ``(1, 1, 1)``.
        case_ids: the case ids; default: the data set's naming style (``case000``, ``la_000``, ``Case00``, ...).
        kind: a key of :py:data:`ANATOMIES` (default: the format's anatomy, ``"la"`` or ``"prostate"``).

    Returns:
        the case ids, in order.

    Raises:
        ValueError: for an unknown format or kind, ``num_cases < 1``, or duplicate case ids.

    Example::

        ids = make_synthetic_dataset("/tmp/la", format="uamt_h5", num_cases=12, shape=(96, 96, 48), seed=0)
    """
    spec = get_format(format)
    kind = spec.anatomy if kind is None else kind
    if kind not in ANATOMIES:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(ANATOMIES)}.")
    ids = [spec.default_case_id(i) for i in range(int(num_cases))] if case_ids is None else [str(c) for c in case_ids]
    if not ids:
        raise ValueError("make_synthetic_dataset needs at least one case.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate case ids: {sorted({c for c in ids if ids.count(c) > 1})}.")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for i, case_id in enumerate(ids):
        image, label = synthetic_case(np.random.default_rng([int(seed), i]), shape=shape, kind=kind)
        spec.write(root, case_id, image, label, spacing=(1.0, 1.0, 1.0) if spacing is None else spacing)
    if spec.case_lists:
        num_test = round(0.2 * len(ids)) if len(ids) > 1 else 0
        split = len(ids) - num_test
        atomic_write_text(root / "train.list", "".join(f"{c}\n" for c in ids[:split]))
        atomic_write_text(root / "test.list", "".join(f"{c}\n" for c in ids[split:]))
    return ids
