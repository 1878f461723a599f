"""Figures: valid PNGs of the expected aspect and content, atomic output, clear errors on mismatched inputs."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from monai_mlbseg.utils.io import TEMP_MARKER
from monai_mlbseg.visualize import save_overlays, save_training_curves, save_weight_maps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path) -> np.ndarray:
    """The image of a valid, non-blank PNG; no temporary files next to it."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert float(img[..., :3].std()) > 0.01, "blank figure"
    assert not [p for p in path.parent.iterdir() if TEMP_MARKER in p.name]
    return img


def slices(n: int = 3, h: int = 32, w: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, h, w)).astype(np.float32)
    labels = np.zeros((n, h, w), dtype=np.uint8)
    labels[:, 8:20, 10:30] = 1
    return images, labels


def test_save_overlays(tmp_path):
    images, labels = slices()
    preds = {"labeled only": np.roll(labels, 3, axis=2), "MLB-Seg": torch.as_tensor(labels)[:, None].float()}
    out = save_overlays(tmp_path / "fig" / "overlays.png", list(images), labels, preds, titles=["a", "b", "c"])
    assert out == tmp_path / "fig" / "overlays.png"
    img = check_png(out)
    h, w = img.shape[:2]
    assert w > h  # 3 columns x 3 rows of 32x48 slices: wider than high
    # the contours are drawn: pure-ish red and green pixels exist
    rgb = img[..., :3]
    assert ((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)).any()
    assert ((rgb[..., 1] > 0.8) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)).any()


def test_save_overlays_max_rows_and_empty_masks(tmp_path):
    images, labels = slices(n=12, h=24, w=24)
    labels[0] = 0  # empty label and prediction: no contour, Dice 1
    few = save_overlays(tmp_path / "few.png", images, labels, {"m": labels}, max_rows=2)
    many = save_overlays(tmp_path / "many.png", images, labels, {"m": labels}, max_rows=6)
    assert check_png(many).shape[0] > 2 * check_png(few).shape[0]


def test_save_overlays_rejects_mismatches(tmp_path):
    images, labels = slices()
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        save_overlays(tmp_path / "x.png", images, labels[:2], {"m": labels})
    with pytest.raises(ValueError, match="predictions of 'm'"):
        save_overlays(tmp_path / "x.png", images, labels, {"m": labels[:1]})
    with pytest.raises(ValueError, match=r"predictions\['m'\]\[0\] has shape \(32, 40\)"):
        save_overlays(tmp_path / "x.png", images, labels, {"m": labels[:, :, :40]})
    with pytest.raises(ValueError, match="2D slice"):
        save_overlays(tmp_path / "x.png", images[:, None, None], labels, {"m": labels})
    with pytest.raises(ValueError, match="titles"):
        save_overlays(tmp_path / "x.png", images, labels, {"m": labels}, titles=["a"])
    with pytest.raises(ValueError, match="at least one method"):
        save_overlays(tmp_path / "x.png", images, labels, {})
    with pytest.raises(ValueError, match=".png"):
        save_overlays(tmp_path / "x.jpg", images, labels, {"m": labels})
    assert list(tmp_path.iterdir()) == []


def test_save_weight_maps(tmp_path):
    g = torch.Generator().manual_seed(0)
    k, h, w = 5, 24, 24
    views = torch.rand(k, 1, h, w, generator=g)
    weights = torch.rand(k, 2, h, w, generator=g)
    labels = (torch.rand(k, h, w, generator=g) > 0.5).float()
    full = check_png(save_weight_maps(tmp_path / "full.png", views, weights, labels, labels))
    short = check_png(save_weight_maps(tmp_path / "short.png", views[:, 0].numpy(), weights.numpy()))
    assert full.shape[1] > full.shape[0]  # 5 columns, 5 rows plus colour bars
    assert full.shape[0] > short.shape[0]  # 2 more rows with the labels
    assert short.shape[1] > 1.5 * short.shape[0]  # 5 columns, 3 rows
    three = check_png(save_weight_maps(tmp_path / "three.png", views[:3], weights[:3], weight_range=(0.0, 1.0)))
    assert three.shape[1] < short.shape[1]
    sources = torch.rand(k, 3, h, w, generator=g)
    names = ["initial", "pseudo", "smoothed"]
    third = check_png(save_weight_maps(tmp_path / "sources.png", views, sources, source_names=names))
    assert third.shape[0] > short.shape[0] and third.shape[1] == short.shape[1]  # one more weight row


def test_save_weight_maps_rejects_mismatches(tmp_path):
    views, weights = np.zeros((5, 16, 16)), np.zeros((5, 2, 16, 16))
    with pytest.raises(ValueError, match=r"1 source channels for 2 source names"):
        save_weight_maps(tmp_path / "x.png", views, weights[:, :1])
    with pytest.raises(ValueError, match=r"2 source channels for 3 source names"):
        save_weight_maps(tmp_path / "x.png", views, weights, source_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"weights must have shape"):
        save_weight_maps(tmp_path / "x.png", views, weights[:4])
    with pytest.raises(ValueError, match="initial_labels"):
        save_weight_maps(tmp_path / "x.png", views, weights, initial_labels=np.zeros((5, 16, 15)))
    with pytest.raises(ValueError, match="pseudo_labels"):
        save_weight_maps(tmp_path / "x.png", views, weights, pseudo_labels=np.zeros((4, 16, 16)))
    with pytest.raises(ValueError, match="views must have 3 dims"):
        save_weight_maps(tmp_path / "x.png", views[0], weights)
    with pytest.raises(ValueError, match="view names"):
        save_weight_maps(tmp_path / "x.png", views, weights, view_names=["a"])
    assert list(tmp_path.iterdir()) == []


def test_save_training_curves(tmp_path):
    history = {
        "stage1/loss": [(i, 1.0 / (i + 1)) for i in range(40)],
        "stage2/loss": [(i, 0.5 + 0.1 * np.sin(i)) for i in range(20)],
        "stage2/weight_initial": [(i, 0.3) for i in range(20)],
        "validation/dice": [(20, 0.6), (10, 0.5), (30, float("nan")), (40, 0.8)],  # unsorted, with a NaN
        "lr": [],  # empty series are skipped
    }
    img = check_png(save_training_curves(tmp_path / "curves.png", history, title="run"))
    one = check_png(save_training_curves(tmp_path / "one.png", {"loss": np.array([[0, 1.0], [1, 0.5]])}))
    assert img.shape[1] > one.shape[1] and img.shape[0] > one.shape[0]  # 2 x 2 grid vs one subplot
    assert one.shape[1] > one.shape[0]


def test_save_training_curves_rejects_bad_history(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        save_training_curves(tmp_path / "x.png", {"a": []})
    with pytest.raises(ValueError, match="'stage1/loss'"):
        save_training_curves(tmp_path / "x.png", {"stage1/loss": [1.0, 2.0]})
    with pytest.raises(ValueError, match="'b'"):
        save_training_curves(tmp_path / "x.png", {"b": [(1, 2.0, 3.0)]})
    assert list(tmp_path.iterdir()) == []


def test_moving_average_and_smoothed_curves(tmp_path):
    from monai_mlbseg.visualize import moving_average

    values = [1.0, 3.0, 2.0, 6.0, 4.0]
    assert np.allclose(moving_average(values, 2), [2.0, 2.5, 4.0, 5.0])
    assert np.allclose(moving_average(values, 5), [3.2])
    with pytest.raises(ValueError, match="window"):
        moving_average(values, 6)
    noisy = {"stage2/loss": [(i, float(i % 2)) for i in range(40)]}
    plain = save_training_curves(tmp_path / "plain.png", noisy)
    smoothed = save_training_curves(tmp_path / "smooth.png", noisy, smooth=8)
    assert plain.read_bytes() != smoothed.read_bytes()
