"""CutMix: boxes pasted between the images of a batch, and targets that follow the pixels they belong to."""

import pytest
import torch
import torch.nn.functional as F
from monai.utils import CommonKeys as Keys

from monai_mlbseg.engines import MetaIterationEvents, matched_control
from monai_mlbseg.engines.stage2 import MeanTeacher, Perturbation
from monai_mlbseg.recipe import stage2_parts, trainer_overrides
from monai_mlbseg.transforms import CutMix, StrongIntensityAugment
from tests.helpers import disc_samples, make_trainer


def _labels(n=6, size=32):
    return torch.stack([s["label"][0] for s in disc_samples(n, size, seed=4)])[:, None].float()


def test_targets_follow_the_pasted_pixels():
    labels = _labels()
    mix = CutMix(prob=1.0).set_random_state(0)
    mixed_images = mix(labels * 0.7 + 0.1)  # an image that is its label, rescaled
    mixed_labels = mix.targets(labels)
    torch.testing.assert_close(mixed_images, mixed_labels * 0.7 + 0.1)
    inside = mix.mask.bool()
    partner = labels[mix.partner]
    assert torch.equal(mixed_labels[inside], partner[inside]) and torch.equal(mixed_labels[~inside], labels[~inside])
    fractions = mix.mask.flatten(1).mean(1)
    assert ((fractions > 0.01) & (fractions < 0.45)).all(), "every image got a box of 2-40 % of its area"
    assert not torch.equal(mixed_labels, labels)


def test_no_box_without_probability_or_partner_and_reproducible_draws():
    labels = _labels()
    assert torch.equal(CutMix(prob=0.0).set_random_state(0)(labels), labels)
    assert torch.equal(CutMix(prob=1.0).set_random_state(0)(labels[:1]), labels[:1])
    a = CutMix(StrongIntensityAugment(), prob=0.5).set_random_state(3)
    b = CutMix(StrongIntensityAugment(), prob=0.5).set_random_state(3)
    torch.testing.assert_close(a(labels), b(labels))
    volume = torch.rand(3, 1, 8, 10, 12)
    mixed = CutMix(prob=1.0).set_random_state(1)(volume)
    assert mixed.shape == volume.shape
    with pytest.raises(RuntimeError, match="aligned with the last batch"):
        CutMix().targets(labels)
    with pytest.raises(ValueError, match="0 <= prob <= 1"):
        CutMix(prob=1.5)
    assert Perturbation(StrongIntensityAugment()).targets(labels) is labels  # moves no pixel: no targets to move


def test_the_teachers_labels_are_mixed_like_the_students_views():
    mix = CutMix(StrongIntensityAugment(), prob=1.0)
    trainer = make_trainer(
        iterations=1, method="weak_to_strong", student_augment=mix, mean_teacher=MeanTeacher(noise=0)
    )

    def independent(e):
        ctx = e.state.stage2
        with torch.no_grad():
            probs = torch.sigmoid(e.mean_teacher.module(ctx.unlabeled.views))
        return (mix.targets(probs) > 0.5).float(), (probs > 0.5).float()

    seen = []
    trainer.add_event_handler(MetaIterationEvents.WEIGHTS_COMPLETED, lambda e: seen.append(independent(e)))
    trainer.run()
    mixed, unmixed = seen[0]
    teacher = trainer.state.weight_maps["sources"]["teacher"]
    torch.testing.assert_close(teacher, mixed)
    assert not torch.equal(mixed, unmixed)


def test_the_matched_control_learns_from_mixed_expert_labels():
    parts = {**matched_control("weak_to_strong"), "clean_augment": CutMix(StrongIntensityAugment(), prob=1.0)}
    trainer = make_trainer(iterations=1, method=None, unlabeled=[], **parts)
    expert = []
    make_views = trainer.make_views
    trainer.make_views = lambda images, labels: expert.append(make_views(images, labels)) or expert[-1]
    trainer.run()
    out = trainer.state.output
    mixed = trainer.clean_augment.targets(expert[0].labels)
    torch.testing.assert_close(out[Keys.LABEL], mixed)
    assert not torch.equal(mixed, expert[0].labels)
    bce = F.binary_cross_entropy_with_logits(out[Keys.PRED].detach(), mixed)
    assert out["loss"] == pytest.approx(float(bce), rel=1e-5)


def test_the_cutmix_option_wraps_only_the_perturbations_a_method_has():
    parts = stage2_parts("weak_to_strong", options={"cutmix": 0.5})
    student = parts["student_augment"]
    assert isinstance(student, CutMix) and student.prob == 0.5 and isinstance(student.base, StrongIntensityAugment)
    assert parts["clean_augment"] is None  # a perturbation the method does not have stays absent
    given = stage2_parts("weak_to_strong", options={"cutmix": 0.5, "clean_augment": {"contrast": 0.1}})
    assert isinstance(given["clean_augment"], CutMix) and given["clean_augment"].base.contrast == 0.1
    assert stage2_parts("mlbseg", options={"cutmix": 0.5, "clean_augment": None})["clean_augment"] is None
    assert trainer_overrides({"cutmix": 0.5}) == {"stage2_options": {"cutmix": 0.5}}
