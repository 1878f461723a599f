"""MetaTrainer keeps SupervisedTrainer's contract: events, engine.state.output, inferer, prepare_batch."""

import math

import pytest
import torch
from monai.data import DataLoader
from monai.engines.utils import IterationEvents
from monai.inferers import SimpleInferer

from monai_mlbseg.engines import MetaIterationEvents, MetaTrainer, stage2_method
from monai_mlbseg.engines.stage2 import STAGE2_TERMS, TwoSteps, UniformWeighting, ViewConsistencyTerm, WeightedStepOnly
from monai_mlbseg.losses import MetaReweightLoss, pixel_bce
from monai_mlbseg.meta import MetaLookAhead
from monai_mlbseg.networks import NestedUNet
from tests.engines.stage2.iteration_log import (
    ALL_EVENTS,
    META_ITERATION,
    SUPERVISED_ITERATION,
    check_iterations,
    record,
)
from tests.helpers import disc_samples, make_trainer

E, M = IterationEvents, MetaIterationEvents


def test_meta_iteration_fires_every_event_once_with_the_expected_output():
    trainer = make_trainer(iterations=2)
    log = record(trainer)
    trainer.run()
    by_event = check_iterations(log, META_ITERATION, 2, views=5)
    assert not by_event[E.INNER_ITERATION_STARTED] and not by_event[E.INNER_ITERATION_COMPLETED]
    for i in range(2):
        params = {event: by_event[event][i][3] for event, _ in META_ITERATION}
        assert not torch.equal(params[M.REAL_STEP_COMPLETED], params[E.BACKWARD_COMPLETED]), "the weighted step"
        assert torch.equal(params[M.CLEAN_BACKWARD_COMPLETED], params[M.CLEAN_STEP_STARTED])
        assert not torch.equal(params[M.CLEAN_STEP_COMPLETED], params[M.CLEAN_BACKWARD_COMPLETED]), "the clean step"
        clean = by_event[M.CLEAN_BACKWARD_COMPLETED][i][2]["loss_clean"]
        assert torch.is_tensor(clean) and clean.requires_grad
    final = by_event[E.MODEL_COMPLETED][-1][2]
    assert {"dice_initial_gt", "dice_pseudo_gt", "dice_pred_gt"} <= set(final)
    assert final["loss"] == trainer.state.output["loss"] and math.isfinite(final["loss"])


def test_fast_mode_and_no_clean_step_keep_the_event_contract():
    trainer = make_trainer(iterations=1, schedule=TwoSteps(reuse_meta_grad=True))
    log = record(trainer)
    trainer.run()
    by_event = check_iterations(log, META_ITERATION, 1, views=5)
    final = by_event[E.MODEL_COMPLETED][0][2]
    assert float(by_event[M.CLEAN_BACKWARD_COMPLETED][0][2]["loss_clean"]) == final["loss_clean"] == final["loss_meta"]
    trainer = make_trainer(iterations=1, schedule=WeightedStepOnly())
    log = record(trainer)
    trainer.run()
    clean_events = (M.CLEAN_STEP_STARTED, M.CLEAN_BACKWARD_COMPLETED, M.CLEAN_STEP_COMPLETED)
    check_iterations(log, [(e, keys) for e, keys in META_ITERATION if e not in clean_events], 1, views=5)


def supervised_trainer(iterations=2, **kwargs):
    """A trainer without unlabeled data, with the default (mlbseg) method's parts; ``kwargs`` replace them."""
    torch.manual_seed(0)
    net = NestedUNet(2, features=(4, 8))
    return MetaTrainer(
        "cpu",
        1,
        DataLoader([], batch_size=1),
        DataLoader(disc_samples(2 * iterations, 16, seed=3), batch_size=2),
        net,
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        **{**stage2_method("mlbseg"), **kwargs},
    )


def test_supervised_iteration_fires_every_event_once_with_the_expected_output():
    trainer = supervised_trainer()
    log = record(trainer)
    trainer.run()
    by_event = check_iterations(log, SUPERVISED_ITERATION, 2, views=10)
    for i in range(2):
        assert not torch.equal(by_event[M.CLEAN_STEP_COMPLETED][i][3], by_event[E.BACKWARD_COMPLETED][i][3])
    final = by_event[E.MODEL_COMPLETED][-1][2]
    assert final["loss"] == final["loss_clean"]
    for event in ALL_EVENTS:
        if event not in dict(SUPERVISED_ITERATION):
            assert not by_event[event], event


class CountingInferer(SimpleInferer):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, inputs, network, *args, **kwargs):
        self.calls += 1
        return super().__call__(inputs, network, *args, **kwargs)


def test_forwards_go_through_the_inferer_and_batches_through_prepare_batch():
    renamed = [{"img": s["image"], "seg": s["label"], "gt": s["gt"]} for s in disc_samples(2, 16, seed=1)]
    clean = [{"img": s["image"], "seg": s["label"]} for s in disc_samples(2, 16, seed=2)]
    prepared = []

    def prepare_batch(batch, device=None, non_blocking=False, **kwargs):
        prepared.append(batch)
        return batch["img"].to(device), batch["seg"].to(device)

    inferer = CountingInferer()
    trainer = make_trainer(unlabeled=renamed, clean=clean, iterations=2, inferer=inferer, prepare_batch=prepare_batch)
    trainer.run()
    assert trainer.inferer is inferer
    assert inferer.calls == 2 * 4, "per iteration: student on the unlabeled and the clean views, teacher on both"
    assert len(prepared) == 2 * 2, "the unlabeled and the clean batch of every iteration"
    assert all(math.isfinite(trainer.state.output[k]) for k in STAGE2_TERMS)

    inferer = CountingInferer()
    trainer = supervised_trainer(iterations=2, inferer=inferer, terms=[ViewConsistencyTerm(1.0)], mean_teacher=None)
    trainer.run()
    assert inferer.calls == 2


def test_unsupported_contract_options_are_refused():
    with pytest.raises(ValueError, match="accumulation_steps"):
        make_trainer(accumulation_steps=2)

    def with_network_args(batch, device=None, non_blocking=False, **kwargs):
        return batch["image"], batch["label"], (1,), {}

    trainer = make_trainer(iterations=1, prepare_batch=with_network_args)
    with pytest.raises(ValueError, match="prepare_batch"):
        trainer.run()
    with pytest.raises(TypeError, match="pixel_loss"):
        make_trainer(loss_function=torch.nn.BCEWithLogitsLoss())
    trainer = make_trainer(iterations=1, loss_function=torch.nn.BCEWithLogitsLoss(), weighting=UniformWeighting())
    assert getattr(trainer.weighting, "lookahead", None) is None


def test_the_lookahead_differentiates_the_loss_functions_pixel_loss():
    def doubled(logits, sources):
        return 2 * pixel_bce(logits, sources)

    loss = MetaReweightLoss(pixel_loss=doubled)
    trainer = make_trainer(iterations=1, loss_function=loss)
    assert trainer.weighting.lookahead.pixel_loss is doubled
    torch.manual_seed(0)
    net = NestedUNet(2, features=(4, 8)).eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    images, clean = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    labels = [(torch.rand(2, 1, 16, 16) > 0.5).float()]
    clean_labels = (torch.rand(2, 1, 16, 16) > 0.5).float()
    plain = MetaLookAhead(net, opt)(images, labels, clean, clean_labels)
    twice = MetaLookAhead(net, opt, pixel_loss=doubled)(images, labels, clean, clean_labels)
    torch.testing.assert_close(twice.neg_meta_grad, 2 * plain.neg_meta_grad, rtol=1e-4, atol=1e-8)
    logits = torch.randn(2, 1, 16, 16)
    assert float(loss(logits, labels)) == pytest.approx(2 * float(MetaReweightLoss()(logits, labels)), rel=1e-6)
