"""Weightings: each against an independent computation, their state, and the selection monitor."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from monai_mlbseg.engines import WEIGHTINGS, MetaIterationEvents, matched_control, pixel_weighting, stage2_method
from monai_mlbseg.engines.stage2 import ConfidenceWeighting, LabeledOnly, PixelWeighting, TwoSteps
from monai_mlbseg.evaluation import selection_auc
from monai_mlbseg.experimental import (
    AdaptiveConfidenceWeighting,
    AmortisedMetaWeighting,
    InstanceMetaWeighting,
    NormalisedMetaWeighting,
    QualityPredictor,
    QualityTerm,
    QualityWeighting,
    corrupt_masks,
    soft_dice_per_view,
)
from monai_mlbseg.recipe import stage2_parts, trainer_overrides
from tests.helpers import disc_samples, make_trainer


def _w2s(iterations=1, **parts):
    """A tiny weak-to-strong trainer with ``parts`` replaced."""
    return make_trainer(iterations=iterations, method="weak_to_strong", **parts)


def _capture(trainer, event=MetaIterationEvents.WEIGHTS_COMPLETED, fn=None):
    """``fn(engine)`` at ``event`` of every iteration, its results collected."""
    seen = []
    trainer.add_event_handler(event, lambda e: seen.append(fn(e)))
    return seen


def test_selection_auc_matches_the_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    positive = torch.rand(60, generator=g) < 0.4
    pairs = [
        1.0 if a > b else 0.5 if a == b else 0.0
        for a, b in itertools.product(scores[positive].tolist(), scores[~positive].tolist())
    ]
    assert selection_auc(scores, positive) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert selection_auc(positive.float(), positive) == 1.0
    assert math.isnan(selection_auc(scores, torch.ones(60, dtype=torch.bool)))
    with pytest.raises(ValueError, match="shapes differ"):
        selection_auc(scores, positive[:10])


def test_adaptive_confidence_weights_follow_the_moving_class_statistics():
    weighting = AdaptiveConfidenceWeighting(momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        probs = torch.rand(2, 1, 8, 8, generator=g)
        before_mean, before_var = weighting.mean.clone(), weighting.var.clone()
        weights = weighting.weights(probs)
        c = torch.maximum(probs, 1 - probs).double()
        k = (probs > 0.5).long()
        for cls in range(2):
            values = c[k == cls]
            expected_mean = float(0.9 * before_mean[cls] + 0.1 * values.mean())
            expected_var = float(0.9 * before_var[cls] + 0.1 * values.var(unbiased=False))
            assert float(weighting.mean[cls]) == pytest.approx(expected_mean, rel=1e-9)
            assert float(weighting.var[cls]) == pytest.approx(expected_var, rel=1e-9)
        for idx in [(0, 0, 1, 2), (1, 0, 5, 7), (0, 0, 7, 0)]:
            cls, ci = int(k[idx]), float(c[idx])
            mu, var = float(weighting.mean[cls]), float(weighting.var[cls])
            expected = 1.0 if ci >= mu else math.exp(-((ci - mu) ** 2) / (2 * var))
            assert float(weights[idx]) == pytest.approx(expected, rel=1e-5)
    state = weighting.state_dict()
    fresh = AdaptiveConfidenceWeighting(momentum=0.9)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.mean, weighting.mean)
    torch.testing.assert_close(fresh.var, weighting.var)


def test_adaptive_confidence_state_survives_a_trainer_checkpoint():
    trainer = _w2s(iterations=2, weighting=AdaptiveConfidenceWeighting())
    trainer.run()
    state = trainer.state_dict()
    assert set(state["parts"]) == {"weighting"}
    resumed = _w2s(iterations=2, weighting=AdaptiveConfidenceWeighting())
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.weighting.mean, trainer.weighting.mean)
    assert resumed.state.iteration == 2
    assert not torch.equal(trainer.weighting.mean, AdaptiveConfidenceWeighting().mean)


def _meta_gradient_by_double_backprop(engine, snapshot, per_view: bool):
    """
    ``-dL_meta/d s`` by second-order autograd, independently of the look-ahead's JVP: ``s`` scales each pixel's (or
    each view's prior-weighted) BCE against the teacher's labels; one SGD step from the snapshot (first step: no
    momentum buffer, weight decay included), then the clean BCE.
    """
    ctx, maps = engine.state.stage2, engine.state.weight_maps
    net = snapshot["net"]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    group = engine.optimizer.param_groups[0]
    label = maps["sources"]["teacher"]
    prior = ConfidenceWeighting(0.5)(ctx, [label], None).weights
    pixel = F.binary_cross_entropy_with_logits(
        functional_call(net, params, (ctx.student_views,)), label, reduction="none"
    )
    s = torch.zeros(pixel.shape[0] if per_view else pixel.shape, requires_grad=True)
    scaled = (s.view(-1, 1, 1, 1) * prior * pixel) if per_view else s * pixel
    grads = torch.autograd.grad(scaled.sum(), list(params.values()), create_graph=True)
    theta_hat = {n: p - group["lr"] * (g + group["weight_decay"] * p) for (n, p), g in zip(params.items(), grads)}
    clean = ctx.clean()
    meta = F.binary_cross_entropy_with_logits(functional_call(net, theta_hat, (clean.views,)), clean.labels)
    (grad_s,) = torch.autograd.grad(meta, s)
    return prior, -grad_s


@pytest.mark.parametrize("cls,per_view", [(NormalisedMetaWeighting, False), (InstanceMetaWeighting, True)])
def test_meta_weightings_match_second_order_autograd(cls, per_view):
    trainer = _w2s(weighting=cls(prior=ConfidenceWeighting(0.5), temperature=0.5), schedule=TwoSteps(), terms=[])
    snapshot = {}
    trainer.add_event_handler(
        MetaIterationEvents.PLE_COMPLETED, lambda e: snapshot.update(net=copy.deepcopy(e.network))
    )
    seen = _capture(trainer, fn=lambda e: (_meta_gradient_by_double_backprop(e, snapshot, per_view), e))
    trainer.run()
    (prior, x), _ = seen[0]
    scale = x.abs().mean() * 0.5
    factor = 2 * torch.sigmoid(x / scale)
    expected = prior * (factor.view(-1, 1, 1, 1) if per_view else factor)
    assert prior.sum() > 0
    got = trainer.state.weight_maps["weights"]
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=1e-9)
    if per_view:  # one factor per view: within a view the weights are the prior's, scaled
        ratio = got[prior > 0] / prior[prior > 0]
        assert ratio.unique().numel() <= got.shape[0]


@pytest.mark.parametrize("max_weight", [2.0, 1.1])
def test_amortised_meta_weighting_starts_as_a_soft_threshold_with_the_thresholds_mass(max_weight):
    # the untrained teacher is sure of no pixel at 0.95: a threshold of 0.6 keeps about a quarter of them
    trainer = _w2s(weighting=AmortisedMetaWeighting(lr=0.0, threshold=0.6, max_weight=max_weight))
    teacher = _capture(trainer, fn=lambda e: e.state.stage2.teacher_probs().clone())
    trainer.run()
    t = teacher[0]
    confidence = 2 * torch.maximum(t, 1 - t) - 1
    soft, hard = torch.sigmoid(20 * (confidence - 0.2)), (confidence >= 0.2).float()
    assert 0 < hard.mean() < 1
    expected = (soft * hard.mean() / soft.mean()).clamp(max=max_weight)
    torch.testing.assert_close(trainer.state.weight_maps["weights"], expected / expected.numel())
    if expected.max() < max_weight:  # no pixel capped: the mass is the hard threshold's
        torch.testing.assert_close(expected.mean(), hard.mean())


def test_amortised_meta_weighting_learns_what_the_meta_gradient_rewards():
    weighting = AmortisedMetaWeighting(lr=0.05, threshold=0.5)  # the untrained teacher is unsure everywhere
    trainer = _w2s(iterations=6, weighting=weighting)
    real = weighting.lookahead

    def rewarding_foreground(views, sources, *args, **kwargs):
        result = real(views, sources, *args, **kwargs)
        foreground = (trainer.state.stage2.teacher_probs() > 0.5).float()
        return result._replace(neg_meta_grad=(2 * foreground - 1).expand_as(result.neg_meta_grad))

    weighting.lookahead = rewarding_foreground
    probe = torch.tensor([[0.05, 1.0, 0.1, 1.0, 1.0], [0.05, 0.0, 0.1, 1.0, 1.0]]).view(2, 5, 1, 1)
    before = weighting.net(probe).detach().flatten()
    assert before[0] == before[1]  # the starting threshold ignores the class
    trainer.run()
    after = weighting.net(probe).detach().flatten()
    assert after[0] - after[1] > 0.05  # foreground pixels, rewarded, now weigh more than background ones
    state = trainer.state_dict()["parts"]["weighting"]
    fresh = AmortisedMetaWeighting(lr=0.05, threshold=0.5)
    _w2s(weighting=fresh)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.net(probe), weighting.net(probe))


def test_corrupted_masks_spread_their_dice_and_soft_dice_is_dice():
    labels = torch.stack([s["label"][0] for s in disc_samples(12, 32, seed=3)])[:, None]
    masks = corrupt_masks(labels, torch.Generator().manual_seed(0))
    assert masks.shape == labels.shape
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    dice = soft_dice_per_view(masks, labels)
    manual = torch.tensor(
        [
            2 * float((m * y).sum()) / float(m.sum() + y.sum()) if (m.sum() + y.sum()) > 0 else 1.0
            for m, y in zip(masks, labels)
        ]
    )
    torch.testing.assert_close(dice, manual)
    assert float(dice.std()) > 0.1
    assert soft_dice_per_view(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)).item() == 1.0


def _quality_trainer(steps=150, **kwargs):
    predictor = QualityPredictor(width=8, steps=steps, batch_views=16, lr=3e-3)
    weighting = QualityWeighting(predictor, prior=ConfidenceWeighting(0.5))
    parts = dict(weighting=weighting, terms=[QualityTerm(predictor, 0.1)])
    return make_trainer(method="weak_to_strong", size=32, **{**parts, **kwargs}), predictor


def test_quality_predictor_learns_dice_from_the_labeled_slices_only():
    trainer, predictor = _quality_trainer(iterations=1)
    fits = []
    fit = predictor.fit
    predictor.fit = lambda t: (fits.append(1), fit(t))
    trainer.run()
    assert fits == [1] and bool(predictor.fitted)
    labels = torch.stack([s["label"][0] for s in disc_samples(24, 32, seed=7)])[:, None]
    images = torch.stack([s["image"][0] for s in disc_samples(24, 32, seed=7)])[:, None]
    masks = corrupt_masks(labels, torch.Generator().manual_seed(5))
    truth = soft_dice_per_view(masks, labels)
    predicted = predictor(images, masks)
    assert float((predicted - truth).abs().mean()) < float((truth - truth.mean()).abs().mean())
    assert torch.corrcoef(torch.stack([predicted, truth]))[0, 1] > 0.5
    # a resumed run keeps the fit instead of refitting
    resumed, other = _quality_trainer(iterations=1)
    resumed.load_state_dict({**trainer.state_dict(), "iteration": 0})
    refits = []
    other.fit = lambda t: refits.append(1)
    resumed.run()
    assert refits == []


def test_quality_weights_and_regulariser_match_the_predictor():
    trainer, predictor = _quality_trainer(steps=5, iterations=1)

    def expected(e):
        ctx, maps = e.state.stage2, e.state.weight_maps
        label = maps["sources"]["teacher"]
        prior = ConfidenceWeighting(0.5)(ctx, [label], None).weights
        q = predictor(ctx.unlabeled.views, label)
        term = (1 - predictor(ctx.unlabeled.views, ctx.probs.detach())).mean()
        return prior * q.view(-1, 1, 1, 1), float(term)

    seen = _capture(trainer, fn=expected)
    trainer.run()
    weights, term = seen[0]
    torch.testing.assert_close(trainer.state.weight_maps["weights"], weights)
    assert trainer.state.output["loss_quality"] == pytest.approx(term, rel=1e-5)
    assert not any(p.requires_grad for p in predictor.parameters())


def test_monitor_reports_the_selection_auc_of_every_source():
    trainer = _w2s(iterations=2, weighting=AdaptiveConfidenceWeighting(momentum=0.5))

    def independent(e):
        from monai_mlbseg.transforms import warp_to_views

        ctx = e.state.stage2
        gt = warp_to_views(e.state.batch["gt"].float(), ctx.unlabeled.params, threshold=0.5)
        source = e.state.weight_maps["sources"]["teacher"]
        return selection_auc(e.state.weight_maps["weights"], (source > 0.5) == (gt > 0.5))

    seen = _capture(trainer, fn=independent)
    trainer.run()
    out = trainer.state.output
    assert out["auc_teacher"] == pytest.approx(seen[-1])
    assert seen[-1] != 0.5
    assert 0.0 <= out["auc_teacher"] <= 1.0
    assert {"weight_teacher_when_wrong", "weight_teacher_when_right"} <= set(out)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_every_weighting_trains_inside_weak_to_strong_and_the_reference(name):
    for method in ("weak_to_strong", "mlbseg"):
        weighting = pixel_weighting(name)
        if isinstance(weighting, QualityWeighting):
            weighting.predictor.steps = 3
        trainer = make_trainer(iterations=2, method=method, weighting=weighting)
        before = [p.detach().clone() for p in trainer.network.parameters()]
        trainer.run()
        out = trainer.state.output
        assert all(math.isfinite(out[k]) for k in ("loss", "loss_weighted", "loss_clean"))
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
        assert trainer.run_settings["weighting"]["_target_"].endswith(type(weighting).__name__)
        weights = trainer.state.weight_maps["weights"]
        assert weights.shape[1] == len(trainer.sources) and (weights >= 0).all()


def test_weighting_names_and_matched_control():
    with pytest.raises(ValueError, match="unknown weighting 'nope'; known: uniform, fixed, meta, adaptive"):
        pixel_weighting("nope")
    for name, kind in WEIGHTINGS.items():  # the one registry builds the product's and the experimental ones
        built = pixel_weighting(name)
        assert isinstance(built, PixelWeighting)
        assert (type(built).__module__.startswith("monai_mlbseg.experimental")) == isinstance(kind, str), name
    assert trainer_overrides({"weighting": "adaptive"}) == {"stage2_options": {"weighting": "adaptive"}}
    assert trainer_overrides({}) == {}
    with pytest.raises(ValueError, match="unknown weighting"):
        trainer_overrides({"weighting": "nope"})
    with pytest.raises(ValueError, match="unknown stage-2 options"):
        trainer_overrides({"trust": "adaptive"})
    assert isinstance(stage2_parts("weak_to_strong", options={"weighting": "adaptive"})["weighting"], PixelWeighting)
    method, control = stage2_method("weak_to_strong"), matched_control("weak_to_strong")
    assert control["sources"] == [] and control["student_augment"] is None
    assert type(control["clean_augment"]) is type(method["student_augment"])
    assert vars(control["clean_augment"]).keys() == vars(method["student_augment"]).keys()
    assert isinstance(control["schedule"], LabeledOnly)
    assert control["schedule"].grad_clip == method["schedule"].grad_clip
    trainer = make_trainer(iterations=2, method=None, **matched_control("weak_to_strong"))  # unlabeled data given
    trainer.run()
    assert trainer.supervised_only and trainer.run_settings["clean_augment"]["contrast"] == 0.25


def test_the_fixed_weighting_is_the_confident_pseudo_label_loss():
    """weak_to_strong's weighted term (teacher labels, 0.95 confidence weights) equals FixMatch's confident BCE."""
    from monai_mlbseg.losses import ConfidentPseudoLabelLoss

    trainer = _w2s(weighting=ConfidenceWeighting(0.6))
    seen = _capture(
        trainer,
        fn=lambda e: float(
            ConfidentPseudoLabelLoss(0.6, sigmoid=True)(e.state.stage2.logits, e.state.stage2.teacher_probs())
        ),
    )
    trainer.run()
    assert trainer.state.output["loss_weighted"] == pytest.approx(seen[0], rel=1e-5)
    assert seen[0] > 0
