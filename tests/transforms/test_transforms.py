import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped

from monai_mlbseg.transforms import (
    DEFAULT_ZOOM_IN_RANGE,
    DEFAULT_ZOOM_OUT_RANGE,
    PLEViews,
    PLEViewsd,
    RandFlipView,
    RandFlipViewd,
    RandZoomView,
    RandZoomViewd,
    ViewParams,
    map_view_pairs,
    ple_pseudo_labels,
    view_pairs,
    warp_from_views,
    warp_to_views,
)


def smooth_blob(shape, width=0.25, centre=0.0):
    """A smooth bump that is ~0 at the image border (so zoom-in crops lose nothing)."""
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = sum((a - centre) ** 2 for a in axes)
    return torch.exp(-r2 / (2 * width**2))


def params_of(scales, flips=None, dims=2):
    scales = torch.as_tensor(scales, dtype=torch.float64)
    if flips is None:
        flips = torch.zeros(*scales.shape, dims, dtype=torch.bool)
    return ViewParams(scales, torch.as_tensor(flips))


@pytest.mark.parametrize("dims", [2, 3])
def test_flip_view_inverse_is_exact(dims):
    x = torch.rand(3, 2, *([9] * dims))
    flip = RandFlipView(spatial_dims=dims).set_random_state(1)
    views = flip(x)
    assert views.shape == x.shape
    assert not torch.equal(views, x)
    assert torch.equal(warp_from_views(views, flip.params), x)
    for b in range(3):
        axes = [d + 1 for d in range(dims) if flip.params.flips[b, 0, d]]
        assert axes, "a flip view flips at least one axis"
        assert torch.equal(views[b], x[b].flip(axes))
    for b in range(3):  # one image at a time: the inverse reads the trace of the MetaTensor views
        assert torch.equal(flip.inverse(flip(x[b])), x[b])


@pytest.mark.parametrize("dims", [2, 3])
def test_zoom_matches_resize_then_crop_or_pad(dims):
    size, pad = 24, 3
    x = torch.rand(1, 1, *([size] * dims))
    mode = "bilinear" if dims == 2 else "trilinear"
    crop = (slice(None), slice(None)) + (slice(pad, -pad),) * dims
    bigger = F.interpolate(x, size=(size + 2 * pad,) * dims, mode=mode, align_corners=False)[crop]
    zoom_in = warp_to_views(x, params_of([[(size + 2 * pad) / size]], dims=dims))
    assert torch.allclose(zoom_in, bigger, atol=1e-5)
    smaller = F.pad(F.interpolate(x, size=(size - 2 * pad,) * dims, mode=mode, align_corners=False), (pad,) * 2 * dims)
    zoom_out = warp_to_views(x, params_of([[(size - 2 * pad) / size]], dims=dims))
    assert torch.allclose(zoom_out, smaller, atol=1e-5)


@pytest.mark.parametrize("dims,size,tol", [(2, 64, 0.02), (3, 32, 0.05)])
def test_zoom_inverse_of_smooth_image(dims, size, tol):
    x = smooth_blob([size] * dims)[None]
    for scale_range in (DEFAULT_ZOOM_IN_RANGE, DEFAULT_ZOOM_OUT_RANGE):
        transform = RandZoomView(scale_range, dims).set_random_state(0)
        view = transform(x)
        assert view.shape == x.shape
        assert (view - x).abs().max() > 0.05, "the view must actually differ from the original"
        back = transform.inverse(view)
        # stated tolerance: max abs error below `tol` for a smooth bump of unit height
        assert (back - x).abs().max() < tol


def test_zoom_in_inverse_border_is_background():
    size = 32
    x = torch.ones(1, 1, size, size)
    scale = 1.25
    back = warp_from_views(warp_to_views(x, params_of([[scale]])), params_of([[scale]]))
    kept = size / scale
    lo, hi = int(math.ceil((size - kept) / 2)) + 1, int((size + kept) / 2) - 1
    assert torch.all(back[..., : lo - 2, :] == 0) and torch.all(back[..., hi + 2 :, :] == 0)
    assert torch.allclose(back[..., lo:hi, lo:hi], torch.ones(1), atol=1e-5)


def test_default_ranges_are_the_reference_pads():
    assert DEFAULT_ZOOM_IN_RANGE == pytest.approx(((144 + 8) / 144, (144 + 60) / 144))
    assert DEFAULT_ZOOM_OUT_RANGE == pytest.approx(((144 - 60) / 144, (144 - 8) / 144))


@pytest.mark.parametrize("dims", [2, 3])
def test_ple_views_layout_and_parameters(dims):
    views = PLEViews(spatial_dims=dims).set_random_state(7)
    x = torch.rand(4, 1, *([12] * dims))
    v = views(x)
    assert v.shape == (20, 1, *([12] * dims))
    p = views.params
    assert p.scales.shape == (4, 5) and p.flips.shape == (4, 5, dims)
    assert torch.all(p.scales[:, [0, 4]] == 1)
    lo, hi = DEFAULT_ZOOM_IN_RANGE
    assert torch.all((p.scales[:, 1] >= lo) & (p.scales[:, 1] <= hi))
    lo, hi = DEFAULT_ZOOM_OUT_RANGE
    assert torch.all((p.scales[:, 2:4] >= lo) & (p.scales[:, 2:4] <= hi))
    assert torch.all(p.scales[:, 2] != p.scales[:, 3])
    assert not p.flips[:, :4].any() and p.flips[:, 4].any(dim=-1).all()
    assert len(set(p.scales[:, 1].tolist())) == 4, "every image draws its own views"
    assert torch.equal(v[0::5], x), "view 0 is the original"
    back = warp_from_views(v, p)
    assert torch.equal(back[4::5], x), "the flip view inverts exactly"


def test_same_seed_same_views_and_other_seed_differs():
    x = torch.rand(2, 1, 16, 16)
    a = PLEViews(2).set_random_state(3)(x)
    b = PLEViews(2).set_random_state(3)(x)
    c = PLEViews(2).set_random_state(4)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_warp_labels_rebinarised_and_consistent_with_images():
    views = PLEViews(2).set_random_state(0)
    image = smooth_blob([32, 32])[None, None].repeat(2, 1, 1, 1)
    label = (image > 0.5).float()
    v = views(image)
    y = views.warp(label, threshold=0.5)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    # the label follows the image: thresholding the warped image agrees with the warped label almost everywhere
    agree = ((v > 0.5).float() == y).float().mean()
    assert agree > 0.98


def test_single_image_metatensor_keeps_meta_and_inverts_through_trace():
    affine = torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.rand(1, 20, 20), affine=affine, meta={"filename_or_obj": "case01.nii.gz"})
    views = PLEViews(2).set_random_state(0)
    out = views(img)
    assert isinstance(out, MetaTensor) and out.shape == (5, 1, 20, 20)
    assert torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "case01.nii.gz"
    assert out.applied_operations[-1]["class"] == "PLEViews"
    views.randomize(1)  # new draw: the inverse must still use the parameters recorded in the trace
    back = views.inverse(out)
    assert back.applied_operations == []
    assert torch.equal(back[0], img.as_tensor()) and torch.equal(back[4], img.as_tensor())


def test_dictionary_forms_in_compose_share_one_draw_and_invert():
    image = smooth_blob([24, 24])[None]
    data = {"image": image, "label": (image > 0.5).float(), "other": torch.zeros(3)}
    pipeline = Compose(
        [EnsureTyped(keys=["image", "label"], track_meta=True), PLEViewsd(["image", "label"], label_keys="label")]
    )
    pipeline.set_random_state(11)
    out = pipeline(data)
    assert out["image"].shape == (5, 1, 24, 24) and out["label"].shape == (5, 1, 24, 24)
    assert torch.equal(out["other"], data["other"])
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
    assert ((out["image"] > 0.5).float() == out["label"]).float().mean() > 0.98
    inverted = pipeline.inverse(out)
    assert torch.equal(inverted["image"][0], image) and torch.equal(inverted["image"][4], image)
    again = Compose(
        [EnsureTyped(keys=["image", "label"], track_meta=True), PLEViewsd(["image", "label"], label_keys="label")]
    )
    again.set_random_state(11)
    assert torch.equal(again(data)["image"], out["image"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandZoomViewd(["image", "label"], DEFAULT_ZOOM_IN_RANGE, label_keys=["label"]),
        lambda: RandZoomViewd(["image", "label"], DEFAULT_ZOOM_OUT_RANGE, label_keys=["label"]),
        lambda: RandFlipViewd(["image", "label"]),
    ],
    ids=["zoom_in", "zoom_out", "flip"],
)
def test_single_view_dictionary_forms(make):
    image = torch.rand(1, 16, 16)
    t = make().set_random_state(0)
    out = t({"image": image, "label": (image > 0.5).float()})
    assert out["image"].shape == (1, 16, 16)
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
    assert t.params.num_views == 1
    back = t.inverse(out)
    assert back["image"].shape == (1, 16, 16) and back["image"].applied_operations == []


def test_zoom_view_scale_range_sets_the_direction():
    zoom_in = RandZoomView(DEFAULT_ZOOM_IN_RANGE).set_random_state(0)
    zoom_in.randomize(50)
    lo, hi = DEFAULT_ZOOM_IN_RANGE
    assert torch.all((zoom_in.params.scales >= lo) & (zoom_in.params.scales <= hi))
    zoom_out = RandZoomView((0.5, 0.6)).set_random_state(0)
    zoom_out.randomize(50)
    assert torch.all((zoom_out.params.scales >= 0.5) & (zoom_out.params.scales <= 0.6))


def test_what_a_compose_after_the_views_receives():
    """Single-sample contract: a MetaTensor [K, C, *S] (or [C, *S] for one view) with the views in its trace."""
    received = {}

    def capture(d):
        received.update(d)
        return d

    affine = torch.diag(torch.tensor([0.7, 0.7, 1.0], dtype=torch.float64))
    image = MetaTensor(smooth_blob([16, 16])[None], affine=affine, meta={"filename_or_obj": "case01.nii.gz"})
    pipeline = Compose(
        [
            EnsureTyped(keys="image", track_meta=True),
            PLEViewsd(["image", "label"], label_keys="label"),
            RandFlipViewd("flip"),
            capture,
        ]
    ).set_random_state(0)
    pipeline({"image": image, "label": (image > 0.5).float(), "flip": torch.rand(2, 16, 16)})
    for key in ("image", "label"):
        x = received[key]
        assert isinstance(x, MetaTensor) and x.shape == (5, 1, 16, 16) and not x.is_batch
        assert [op["class"] for op in x.applied_operations][-1] == "PLEViews"
        trace = x.applied_operations[-1]
        assert trace["orig_size"] == (16, 16)
        assert torch.equal(ViewParams.from_dict(trace["extra_info"]).scales, pipeline.transforms[1].params.scales)
    assert torch.equal(received["image"].affine, affine)
    assert received["image"].meta["filename_or_obj"] == "case01.nii.gz"
    # a plain-tensor sample becomes a MetaTensor too, its trace holding the one view
    flip = received["flip"]
    assert isinstance(flip, MetaTensor) and flip.shape == (2, 16, 16)
    assert [op["class"] for op in flip.applied_operations] == ["RandFlipView"]


def test_inverse_reads_the_trace_only():
    zoom = RandZoomView(DEFAULT_ZOOM_IN_RANGE).set_random_state(0)
    image = smooth_blob([24, 24])[None]
    view = zoom(image)
    expected = warp_from_views(view.as_tensor()[None], zoom.params)[0]
    zoom(image)  # another draw in between: the inverse must not use it
    assert torch.equal(zoom.inverse(view).as_tensor(), expected)
    with pytest.raises(ValueError, match="trace"):
        zoom.inverse(view.as_tensor())  # no trace, no stateful fallback
    with pytest.raises(ValueError, match="warp_from_views"):
        zoom.inverse(zoom(torch.rand(2, 1, 24, 24)))  # batches are plain tensors
    with pytest.raises(RuntimeError):
        RandFlipView().inverse(zoom(image))  # another transform's trace entry


def test_ple_pseudo_labels_of_an_equivariant_predictor():
    views = PLEViews(2).set_random_state(5)
    truth = smooth_blob([48, 48], width=0.3)[None, None].repeat(2, 1, 1, 1)
    probs = views(truth)  # a predictor that is exactly equivariant to the views
    result = ple_pseudo_labels(probs, views.params)
    assert result.mean_prob.shape == (2, 1, 48, 48) and result.pseudo_labels.shape == (10, 1, 48, 48)
    assert (result.mean_prob - truth).abs().max() < 0.03
    expected = views.warp(truth, threshold=0.5)
    assert (result.pseudo_labels != expected).float().mean() < 0.01
    assert not result.pseudo_labels.requires_grad


def test_ple_mean_counts_zoom_in_border_as_background():
    flips = torch.zeros(1, 5, 2, dtype=torch.bool)
    flips[0, 4, 1] = True
    params = params_of([[1.0, 1.4, 0.7, 0.8, 1.0]], flips)
    ones = torch.ones(1, 1, 32, 32)
    result = ple_pseudo_labels(warp_to_views(ones, params), params)
    # 2 px from the corner: original 1, zoom-in 0 (cropped away, ~4.6 px at 1.4), both zoom-outs 1, flip 1
    assert result.mean_prob[0, 0, 2, 2] == pytest.approx(0.8, abs=1e-4)
    assert result.mean_prob[0, 0, 16, 16] == pytest.approx(1.0, abs=1e-4)


def test_map_view_pairs_composes_inverse_and_forward():
    views = PLEViews(2).set_random_state(2)
    x = smooth_blob([32, 32], width=0.3)[None, None].repeat(3, 1, 1, 1)
    v = views(x)
    back = warp_from_views(v, views.params)
    pairs = map_view_pairs(back, views.params)
    ks, ls = view_pairs(5)
    assert len(ks) == 10 and all(k < j for k, j in zip(ks, ls))
    assert pairs.shape == (30, 1, 32, 32)
    # for an equivariant map every mapped partner is (close to) the anchor view itself
    anchors = v.reshape(3, 5, 1, 32, 32)[:, ks].reshape(30, 1, 32, 32)
    assert (pairs - anchors).abs().max() < 0.05


def test_views_follow_the_input_device_and_dtype():
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    views = PLEViews(2)
    assert views(x).dtype == torch.float64
    if torch.cuda.is_available():
        y = views(x.cuda())
        assert y.is_cuda and torch.allclose(y.cpu(), views.warp(x))


def test_errors_are_clear():
    with pytest.raises(ValueError, match="spatial dims"):
        PLEViews(2)(torch.rand(8, 8))
    with pytest.raises(ValueError, match="above 1"):
        PLEViews(2, zoom_in_range=(0.8, 1.2))
    with pytest.raises(ValueError, match="below 1"):
        PLEViews(2, zoom_out_range=(0.8, 1.2))
    with pytest.raises(ValueError, match="0 < low <= high"):
        RandZoomView((1.2, 0.8))
    with pytest.raises(ValueError, match="spatial_axes"):
        RandFlipView(2, spatial_axes=[2])
    with pytest.raises(RuntimeError, match="no views drawn"):
        _ = PLEViews(2).params
    views = PLEViews(2)
    views(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="drawn views are for 2 images"):
        views.warp(torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="label_keys"):
        PLEViewsd(["image"], label_keys="label")
    with pytest.raises(ValueError, match="items"):
        warp_from_views(torch.rand(4, 1, 8, 8), views.params)
    with pytest.raises(ValueError, match="positive"):
        params_of([[0.0]])


def test_flip_subset_distribution_covers_all_choices():
    flip = RandFlipView(3, spatial_axes=[0, 1, 2]).set_random_state(0)
    flip.randomize(700)
    codes = {tuple(row.tolist()) for row in flip.params.flips[:, 0]}
    assert len(codes) == 7 and (False, False, False) not in codes
    counts = np.unique(flip.params.flips[:, 0].numpy(), axis=0, return_counts=True)[1]
    assert counts.min() > 60


def test_random_box_masks_are_one_box_of_the_given_side_each():
    from monai_mlbseg.transforms import random_box_masks

    masks = random_box_masks(6, (12, 9), 2 / 3, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (6, 1, 12, 9) and set(masks.unique().tolist()) == {0.0, 1.0}
    for m in masks[:, 0]:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert len(rows) == 8 and len(cols) == 6 and m.sum() == 48, "an 8 x 6 box, filled"
        assert (rows.diff() == 1).all() and (cols.diff() == 1).all()
    again = random_box_masks(6, (12, 9), 2 / 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again) and not all(torch.equal(masks[0], m) for m in masks[1:])
    assert random_box_masks(2, (4, 4, 4), 1.0).sum() == 2 * 64
    with pytest.raises(ValueError, match="fraction"):
        random_box_masks(1, (8, 8), 0.0)
