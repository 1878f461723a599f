"""Bidirectional copy-paste (BCP) between labeled and unlabeled views: the loss, the boxes, the mixes, the trainer."""

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss

from monai_mlbseg.engines import matched_control
from monai_mlbseg.engines.stage2 import BidirectionalCopyPasteTerm, LabeledViews, ViewBatch, weighted_dice_bce
from monai_mlbseg.recipe import stage2_parts
from tests.helpers import make_trainer


def test_the_weighted_loss_is_dice_and_cross_entropy_weighted_per_pixel():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 1, 6, 5), (torch.rand(3, 1, 6, 5) > 0.5).float()
    plain = weighted_dice_bce(logits, target, torch.ones_like(target))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    assert float(plain) == pytest.approx(0.5 * float(bce + dice), rel=1e-5)

    weight = torch.rand(3, 1, 6, 5)
    x, t, w = logits.double().numpy(), target.double().numpy(), weight.double().numpy()
    expected = []
    for i in range(3):
        p = 1 / (1 + np.exp(-x[i]))
        bce_i = -(t[i] * np.log(p) + (1 - t[i]) * np.log(1 - p))
        dice_i = 1 - (2 * (w[i] * p * t[i]).sum() + 1) / ((w[i] * p).sum() + (w[i] * t[i]).sum() + 1)
        expected.append((w[i] * bce_i).sum() / w[i].sum() + dice_i)
    assert float(weighted_dice_bce(logits, target, weight)) == pytest.approx(0.5 * np.mean(expected), rel=1e-5)
    outside = weight.clone()
    outside[..., :3, :] = 0
    changed = target.clone()
    changed[..., :3, :] = 1 - changed[..., :3, :]
    assert float(weighted_dice_bce(logits, changed, outside)) == pytest.approx(
        float(weighted_dice_bce(logits, target, outside)), rel=1e-6
    ), "a pixel of weight 0 does not count"


def test_boxes_have_the_configured_sides_inside_the_image_and_follow_the_seed():
    term = BidirectionalCopyPasteTerm(box=2 / 3)
    like = torch.zeros(50, 1, 12, 9)
    torch.manual_seed(3)
    boxes = term.boxes(like)
    for mask in boxes[:, 0]:
        rows, cols = torch.nonzero(mask.sum(1)).flatten(), torch.nonzero(mask.sum(0)).flatten()
        assert (len(rows), len(cols)) == (8, 6) and mask.sum() == 48, "one box of 2/3 of each side"
    assert len({tuple(torch.nonzero(m[0])[0].tolist()) for m in boxes}) > 5, "the boxes lie at random places"
    torch.manual_seed(3)
    assert torch.equal(term.boxes(like), boxes)
    volume = term.boxes(torch.zeros(2, 1, 6, 9, 3))
    assert volume.shape == (2, 1, 6, 9, 3) and (volume.flatten(1).sum(1) == 4 * 6 * 2).all(), "3D boxes too"
    with pytest.raises(ValueError, match="box"):
        BidirectionalCopyPasteTerm(box=1.0)
    with pytest.raises(ValueError, match="unlabeled_weight"):
        BidirectionalCopyPasteTerm(unlabeled_weight=1.5)


class FixedBox(BidirectionalCopyPasteTerm):
    """The box of rows 1-3, columns 2-4 of every image."""

    def boxes(self, like):
        mask = torch.zeros(like.shape[0], 1, *like.shape[2:])
        mask[..., 1:4, 2:5] = 1
        return mask


class Context:
    """The part of a stage-2 iteration the term reads."""

    def __init__(self, student_views, teacher, clean, student):
        self.student_views, self.threshold, self.student = student_views, 0.5, student
        self._teacher, self._clean = teacher, clean

    def teacher_probs(self):
        return self._teacher

    def clean(self):
        return self._clean


def test_each_view_is_pasted_into_the_other_and_learns_the_expert_label_and_the_teachers_label():
    torch.manual_seed(1)
    labeled, expert = torch.rand(2, 1, 6, 7), (torch.rand(2, 1, 6, 7) > 0.5).float()
    unlabeled, teacher = torch.rand(3, 1, 6, 7), torch.rand(3, 1, 6, 7)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    seen = []
    student = lambda x: seen.append(x) or conv(x)  # noqa: E731
    term = FixedBox(weight=1.0, unlabeled_weight=0.25)
    clean = ViewBatch(labeled, expert, None)
    loss = term(Context(unlabeled, teacher, clean, student))

    into_labeled, into_unlabeled = labeled.clone(), unlabeled[:2].clone()
    into_labeled[..., 1:4, 2:5] = unlabeled[:2, :, 1:4, 2:5]
    into_unlabeled[..., 1:4, 2:5] = labeled[..., 1:4, 2:5]
    torch.testing.assert_close(seen[0], torch.cat([into_labeled, into_unlabeled]))
    pseudo = (teacher[:2] > 0.5).float()
    target_a, target_b = expert.clone(), pseudo.clone()
    target_a[..., 1:4, 2:5], target_b[..., 1:4, 2:5] = pseudo[..., 1:4, 2:5], expert[..., 1:4, 2:5]
    weight_a, weight_b = torch.ones(2, 1, 6, 7), torch.full((2, 1, 6, 7), 0.25)
    weight_a[..., 1:4, 2:5], weight_b[..., 1:4, 2:5] = 0.25, 1.0
    expected = weighted_dice_bce(conv(seen[0]), torch.cat([target_a, target_b]), torch.cat([weight_a, weight_b]))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    loss.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, "the student learns from the mixes"

    views = LabeledViews(ViewBatch(labeled, expert, None), None, None, student=student)
    control = term.clean(views)
    mixed = labeled.clone()
    mixed[..., 1:4, 2:5] = labeled.roll(1, 0)[..., 1:4, 2:5]
    torch.testing.assert_close(seen[1][:2], mixed, msg="the control mixes each labeled view with the previous one")
    assert float(control.detach()) > 0
    with pytest.raises(ValueError, match="student's forward"):
        term.clean(LabeledViews(ViewBatch(labeled, expert, None), None, None))


def test_the_default_with_copy_paste_trains_and_its_matched_control_mixes_labeled_views_only():
    parts = stage2_parts("weak_to_strong", options={"copy_paste": 0.5})
    assert isinstance(parts["terms"][-1], BidirectionalCopyPasteTerm) and parts["terms"][-1].weight == 0.5
    trainer = make_trainer(iterations=2, method=None, **parts)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    out = trainer.state.output
    assert np.isfinite(out["loss_bcp"]) and out["loss_bcp"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    assert trainer.run_settings["terms"][-1]["unlabeled_weight"] == 0.5

    control = stage2_parts("weak_to_strong", options={"copy_paste": {"weight": 1.0, "box": 0.5}}, control=True)
    plain = make_trainer(iterations=1, method=None, unlabeled=[], **matched_control("weak_to_strong"))
    mixed = make_trainer(iterations=1, method=None, unlabeled=[], **control)
    plain.run()
    mixed.run()
    assert mixed.state.output["loss_clean"] > plain.state.output["loss_clean"], "the control's loss has the mix"
    with pytest.raises(ValueError, match="do not combine"):
        stage2_parts("weak_to_strong", options={"copy_paste": 1.0, "cutmix": 0.5})
