"""JointStep (one optimizer step on the weighted + clean loss) and the experimental AgreementMetaWeighting."""

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents as E

from monai_mlbseg.engines import MetaIterationEvents as M
from monai_mlbseg.engines.stage2 import (
    InitialLabels,
    JointStep,
    MetaWeighting,
    TwoSteps,
    UniformWeighting,
    WeightedStepOnly,
)
from monai_mlbseg.experimental import AgreementMetaWeighting
from monai_mlbseg.meta import normalise_weights
from monai_mlbseg.transforms import PLEViews, warp_to_views
from tests.engines.stage2.iteration_log import META_ITERATION, check_iterations, record
from tests.helpers import corrupt, count_steps, disc_samples, make_trainer


def plain(**parts):
    """Self-training on the initial labels without regularisers: the joint loss is two plain mean BCEs."""
    return dict(sources=[InitialLabels()], terms=[], mean_teacher=None, grad_clip=None) | parts


def _reference_views(unlabeled, clean):
    """The views the trainer draws in its first iteration (seed 0): the unlabeled image's, then the clean batch's."""
    views = PLEViews(2).set_random_state(0)
    v = views(unlabeled[0]["image"][None])
    v_labels = warp_to_views(unlabeled[0]["label"][None], views.params, threshold=0.5)
    images = torch.stack([clean[0]["image"], clean[1]["image"]])
    cv = views(images)
    cv_labels = warp_to_views(torch.stack([clean[0]["label"], clean[1]["label"]]), views.params, threshold=0.5)
    return v, v_labels, cv, cv_labels


def test_joint_step_is_one_sgd_step_on_the_weighted_and_the_clean_loss():
    unlabeled, clean = corrupt(disc_samples(2, 16, seed=1)), disc_samples(4, 16, seed=2)
    trainer = make_trainer(
        iterations=1, unlabeled=unlabeled, clean=clean, **plain(weighting=UniformWeighting(), schedule=JointStep())
    )
    net = copy.deepcopy(trainer.network)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = count_steps(trainer)
    trainer.run()

    v, v_labels, cv, cv_labels = _reference_views(unlabeled, clean)
    weighted = F.binary_cross_entropy_with_logits(net(v), v_labels)
    clean_loss = F.binary_cross_entropy_with_logits(net(cv), cv_labels)
    opt.zero_grad()
    (weighted + clean_loss).backward()
    opt.step()
    out = trainer.state.output
    assert steps["n"] == 1, "one optimizer step per iteration"
    assert out["loss_weighted"] == pytest.approx(float(weighted.detach()), rel=1e-5)
    assert out["loss_clean"] == pytest.approx(float(clean_loss.detach()), rel=1e-5)
    assert out["loss"] == pytest.approx(float((weighted + clean_loss).detach()), rel=1e-5)
    for p, q in zip(trainer.network.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_joint_step_look_ahead_includes_the_clean_gradient():
    """The virtual step of the look-ahead is the step really made: its other-terms gradient is the clean BCE's."""
    unlabeled, clean = corrupt(disc_samples(2, 16, seed=1)), disc_samples(4, 16, seed=2)
    trainer = make_trainer(
        iterations=1, unlabeled=unlabeled, clean=clean, **plain(weighting=MetaWeighting(), schedule=JointStep())
    )
    net = copy.deepcopy(trainer.network)
    seen = {}
    lookahead = trainer.weighting.lookahead

    def recording(*args, **kwargs):
        seen.update(kwargs["lookahead_grads"])
        return lookahead(*args, **kwargs)

    trainer.weighting.lookahead = recording
    trainer.run()
    _, _, cv, cv_labels = _reference_views(unlabeled, clean)
    expected = torch.autograd.grad(F.binary_cross_entropy_with_logits(net(cv), cv_labels), list(net.parameters()))
    assert set(seen) == {n for n, _ in net.named_parameters()}
    for (name, _), grad in zip(net.named_parameters(), expected):
        torch.testing.assert_close(seen[name], grad, rtol=1e-4, atol=1e-6)


def test_joint_step_event_contract_has_no_clean_step():
    """MONAI's events once per iteration; the clean loss is in the output from the weight maps on; no clean step."""
    trainer = make_trainer(iterations=2, schedule=JointStep())
    log = record(trainer)
    trainer.run()
    clean_events = {M.CLEAN_STEP_STARTED, M.CLEAN_BACKWARD_COMPLETED, M.CLEAN_STEP_COMPLETED}
    expected = [
        (e, keys if e in (E.FORWARD_COMPLETED, M.PLE_COMPLETED) else keys | {"loss_clean"})
        for e, keys in META_ITERATION
        if e not in clean_events
    ]
    by_event = check_iterations(log, expected, 2, views=5)
    clean = by_event[E.LOSS_COMPLETED][0][2]["loss_clean"]
    assert torch.is_tensor(clean) and clean.requires_grad
    out = trainer.state.output
    assert out["loss"] == pytest.approx(out["loss_weighted"] + out["loss_pc"] + out["loss_mt"] + out["loss_clean"])


def test_joint_step_cannot_be_combined_with_options_without_a_clean_loss():
    """
    The old refusals of joint_step with clean_step=False or reuse_meta_grad=True: one trainer has one schedule, so a
    joint step without a clean loss, or one that reuses the meta-gradient for a clean step, cannot be expressed.
    """
    assert JointStep().joint_loss.__func__ is JointStep.joint_loss, "a joint step always has the clean loss"
    with pytest.raises(TypeError):
        JointStep(reuse_meta_grad=True)
    with pytest.raises(TypeError, match="StepSchedule"):
        make_trainer(schedule=[JointStep(), WeightedStepOnly()])


@pytest.mark.parametrize(
    "weighting",
    [lambda: MetaWeighting(meta_params=["nodes.conv0_0"]), UniformWeighting],
    ids=["meta_params", "uniform"],
)
def test_reuse_meta_grad_needs_a_meta_weighting_over_all_parameters(weighting):
    with pytest.raises(ValueError, match="reuse_meta_grad"):
        make_trainer(weighting=weighting(), schedule=TwoSteps(reuse_meta_grad=True))


def test_agreement_weights_sum_to_the_agreeing_share():
    x = torch.tensor([[-2.0, 0.5, 3.0, 0.0, 1.5]])
    torch.testing.assert_close(normalise_weights(x, weighting="agreement"), torch.relu(x) / 7.0)
    assert float(normalise_weights(x, weighting="agreement").sum()) == pytest.approx(5.0 / 7.0)
    assert torch.equal(normalise_weights(-x.abs(), weighting="agreement"), torch.zeros_like(x))


def test_agreement_weighting_scales_the_reference_maps_and_the_weighted_term():
    """Same first iteration: the agreement maps are the reference maps times one factor below 1, and so is the term."""
    runs = {}
    for name, weighting in (("gradient", MetaWeighting()), ("agreement", AgreementMetaWeighting())):
        trainer = make_trainer(iterations=1, weighting=weighting)
        trainer.run()
        runs[name] = (trainer.state.weight_maps["weights"], trainer.state.output)
    (reference, ref_out), (agreement, out) = runs["gradient"], runs["agreement"]
    share = float(agreement.sum())
    assert 0 < share < 1 and float(reference.sum()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(agreement, reference * share, rtol=1e-4, atol=1e-9)
    assert out["weight_initial"] + out["weight_pseudo"] == pytest.approx(share, rel=1e-4)
    assert out["loss_weighted"] == pytest.approx(share * ref_out["loss_weighted"], rel=1e-4)
