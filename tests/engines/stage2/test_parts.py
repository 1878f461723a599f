"""A new idea is one small class: a pixel weighting and an unlabeled term written here, each trained with."""

import copy

import pytest
import torch
import torch.nn.functional as F

from monai_mlbseg.engines.stage2 import (
    ConfidenceWeighting,
    InitialLabels,
    MeanTeacher,
    PixelWeighting,
    TeacherLabels,
    UniformWeighting,
    UnlabeledTerm,
    WeightedStepOnly,
    WeightMaps,
)
from monai_mlbseg.transforms import PLEViews, warp_to_views
from tests.helpers import corrupt, disc_samples, make_trainer


class CertaintyWeighting(PixelWeighting):
    """Each pixel weighs ``1 - H(p)`` (binary entropy in bits of the student's probability), summing to 1."""

    def __call__(self, ctx, sources, step_terms):
        p = ctx.probs.detach().clamp(1e-6, 1 - 1e-6)
        certainty = 1 + (p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
        weights = certainty.expand(-1, len(sources), *certainty.shape[2:])
        return WeightMaps(weights / weights.sum())


class EntropyTerm(UnlabeledTerm):
    """Entropy minimisation: the mean binary entropy (nats) of the student's probabilities on the unlabeled views."""

    name = "loss_entropy"

    def __call__(self, ctx):
        p = ctx.probs.clamp(1e-6, 1 - 1e-6)
        return -(p * torch.log(p) + (1 - p) * torch.log(1 - p)).mean()


def _views_and_student(unlabeled, net):
    """The first iteration's views (the trainer's view seed 0) and the untrained student's logits on them."""
    views = PLEViews(2).set_random_state(0)
    image, initial = unlabeled[0]["image"][None], unlabeled[0]["label"][None]
    v = views(image)
    return v, warp_to_views(initial, views.params, threshold=0.5), net(v)


def _one_step(trainer, net, loss):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for p, q in zip(trainer.network.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_new_pixel_weighting_is_one_class_and_trains():
    unlabeled = corrupt(disc_samples(2, 16, seed=1))
    options = dict(sources=[InitialLabels()], weighting=CertaintyWeighting(), schedule=WeightedStepOnly())
    trainer = make_trainer(iterations=1, unlabeled=unlabeled, method=None, grad_clip=None, **options)
    net = copy.deepcopy(trainer.network)
    trainer.run()
    v, initial, logits = _views_and_student(unlabeled, net)
    p = torch.sigmoid(logits).detach().clamp(1e-6, 1 - 1e-6)
    bits = -(p * p.log() + (1 - p) * (1 - p).log()) / torch.log(torch.tensor(2.0))
    w = (1 - bits) / (1 - bits).sum()
    torch.testing.assert_close(trainer.state.weight_maps["weights"], w, rtol=1e-4, atol=1e-8)
    assert trainer.run_settings["weighting"] == {"_target_": f"{__name__}.CertaintyWeighting"}
    assert trainer.state.output["weight_initial"] == pytest.approx(1.0, abs=1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, initial, reduction="none")
    _one_step(trainer, net, (w * bce).sum())


def test_a_new_unlabeled_term_is_one_class_and_trains():
    unlabeled = corrupt(disc_samples(2, 16, seed=1))
    options = dict(terms=[EntropyTerm(0.5)], schedule=WeightedStepOnly())
    trainer = make_trainer(iterations=1, unlabeled=unlabeled, method=None, grad_clip=None, **options)
    net = copy.deepcopy(trainer.network)
    trainer.run()
    _, _, logits = _views_and_student(unlabeled, net)
    p = torch.sigmoid(logits).clamp(1e-6, 1 - 1e-6)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    out = trainer.state.output
    assert out["loss_entropy"] == pytest.approx(float(entropy.detach()), rel=1e-5)
    assert out["loss"] == pytest.approx(0.5 * out["loss_entropy"], rel=1e-6), "the term enters with its weight"
    assert trainer.run_settings["terms"] == [{"_target_": f"{__name__}.EntropyTerm", "weight": 0.5}]
    _one_step(trainer, net, 0.5 * entropy)


def test_confidence_weighting_keeps_the_teachers_confident_pixels():
    trainer = make_trainer(
        iterations=1, method=None, sources=[TeacherLabels()], weighting=ConfidenceWeighting(0.6),
        mean_teacher=MeanTeacher(noise=0.0), schedule=WeightedStepOnly(),
    )  # fmt: skip
    seen = {}
    real = trainer.weighting.__call__

    def spy(ctx, sources, step_terms):
        seen["teacher"], seen["sources"] = ctx.teacher_probs().clone(), [s.clone() for s in sources]
        return real(ctx, sources, step_terms)

    trainer.weighting = type("Spy", (PixelWeighting,), {"__call__": lambda self, *a: spy(*a)})()
    trainer.run()
    t = seen["teacher"]
    confident = (torch.maximum(t, 1 - t) >= 0.6).float()
    torch.testing.assert_close(trainer.state.weight_maps["weights"], confident / confident.numel())
    torch.testing.assert_close(seen["sources"][0], (t > 0.5).float())
    assert 0 < confident.mean() < 1, "some pixels confident, some not: the test tells the rule apart"
    with pytest.raises(ValueError, match="threshold"):
        ConfidenceWeighting(0.4)


def test_uniform_weighting_sums_to_one_over_every_source():
    trainer = make_trainer(iterations=1, method=None, sources=[InitialLabels(), TeacherLabels()],
                           weighting=UniformWeighting(), mean_teacher=MeanTeacher())  # fmt: skip
    trainer.run()
    weights = trainer.state.weight_maps["weights"]
    assert weights.shape[1] == 2 and torch.allclose(weights, weights.flatten()[0].expand_as(weights))
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
