"""Feature dropout: channel dropout of named modules' outputs, only in the forward of the perturbed views."""

import pytest
import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn

from monai_mlbseg.engines import MetaIterationEvents, matched_control
from monai_mlbseg.engines.stage2 import MeanTeacher, Perturbation
from monai_mlbseg.recipe import stage2_parts
from monai_mlbseg.transforms import CutMix, FeatureDropout, StrongIntensityAugment
from tests.helpers import make_trainer

TINY = ("nodes.conv0_0", "nodes.conv1_0")  # the encoder blocks of make_trainer's NestedUNet(2, features=(4, 8))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.Identity(), nn.Conv2d(64, 1, 1))


def test_channels_are_dropped_and_rescaled_only_inside_the_block():
    net, x = _net(), torch.rand(8, 1, 6, 6)
    features = []
    net[2].register_forward_pre_hook(lambda m, i: features.append(i[0].detach()))  # what the next layer sees
    plain = net(x)
    drop = FeatureDropout(prob=0.5, modules=["1"]).set_random_state(0)
    with drop.perturbing(net):
        perturbed = net(x)
    clean, dropped = net[0](x).detach(), features[1]
    kept = dropped.flatten(2).abs().sum(2) > 0
    assert 0.35 < kept.float().mean() < 0.65, "about half of the 8 x 64 channels are kept"
    expected = clean * kept[..., None, None] * 2.0
    torch.testing.assert_close(dropped, expected)
    torch.testing.assert_close(perturbed, net[2](expected))
    torch.testing.assert_close(net(x), plain)  # the hook is gone after the block
    again = FeatureDropout(prob=0.5, modules=["1"]).set_random_state(0)
    with again.perturbing(net):
        torch.testing.assert_close(net(x), perturbed)  # the masks follow the transform's seed
    with FeatureDropout(prob=0.0, modules=["1"]).perturbing(net):
        torch.testing.assert_close(net(x), plain)


def test_bad_arguments_and_unknown_modules_are_named():
    with pytest.raises(ValueError, match="0 <= prob < 1"):
        FeatureDropout(prob=1.0)
    with pytest.raises(ValueError, match="sequence of module names"):
        FeatureDropout(modules="nodes.conv0_0")
    with pytest.raises(ValueError, match=r"\['encoder'\] are not modules of the network"):
        with FeatureDropout(modules=["0", "encoder"]).perturbing(_net()):
            pass


def test_the_input_side_and_the_chain_of_perturbations():
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(FeatureDropout()(x), x)
    a = FeatureDropout(StrongIntensityAugment(), 0.5).set_random_state(2)
    b = StrongIntensityAugment().set_random_state(3)
    torch.testing.assert_close(a(x), b(x))  # the base is seeded with the seed + 1
    drop = FeatureDropout(modules=["1"])
    net = _net()
    with Perturbation(CutMix(drop, 0.5)).forward(net):
        assert len(net[1]._forward_hooks) == 1  # found inside a CutMix, by its trait
    assert len(net[1]._forward_hooks) == 0
    with Perturbation(CutMix(StrongIntensityAugment())).forward(net), Perturbation(None).forward(net):
        assert len(net[1]._forward_hooks) == 0


def test_the_students_forward_is_perturbed_and_the_teachers_is_not():
    drop = FeatureDropout(StrongIntensityAugment(), prob=0.5, modules=TINY)
    trainer = make_trainer(
        iterations=1, method="weak_to_strong", student_augment=drop, mean_teacher=MeanTeacher(noise=0)
    )
    seen = {}

    def student(e):
        with torch.no_grad():
            seen["plain"] = e.network(e.state.output[Keys.IMAGE])
        seen["student"] = e.state.output[Keys.PRED].detach()

    def teacher(e):
        with torch.no_grad():
            seen["teacher"] = (torch.sigmoid(e.mean_teacher.module(e.state.stage2.unlabeled.views)) > 0.5).float()
        seen["w"] = e.state.weight_maps

    trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED, student)
    trainer.add_event_handler(MetaIterationEvents.WEIGHTS_COMPLETED, teacher)
    trainer.run()
    assert not torch.allclose(seen["student"], seen["plain"], atol=1e-4)
    torch.testing.assert_close(seen["w"]["sources"]["teacher"], seen["teacher"])


def test_the_matched_control_perturbs_the_features_of_its_labeled_views():
    parts = {**matched_control("weak_to_strong"), "clean_augment": FeatureDropout(prob=0.5, modules=TINY)}
    trainer = make_trainer(iterations=2, method=None, unlabeled=[], **parts)
    pairs = []

    def compare(e):
        with torch.no_grad():
            pairs.append((e.state.output[Keys.PRED].detach(), e.network(e.state.output[Keys.IMAGE])))

    trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED, compare)
    trainer.run()
    assert len(pairs) == 2
    assert all(not torch.allclose(student, plain, atol=1e-4) for student, plain in pairs)


def test_the_feature_dropout_option_wraps_the_methods_perturbations():
    parts = stage2_parts("weak_to_strong", options={"feature_dropout": 0.5, "cutmix": 0.3})
    student = parts["student_augment"]
    assert isinstance(student, CutMix) and student.prob == 0.3
    assert isinstance(student.base, FeatureDropout) and student.base.prob == 0.5
    assert isinstance(student.base.base, StrongIntensityAugment)
    assert parts["clean_augment"] is None  # a perturbation the method does not have stays absent
    given = stage2_parts("weak_to_strong", options={"feature_dropout": 0.5, "clean_augment": {"contrast": 0.1}})
    assert isinstance(given["clean_augment"], FeatureDropout) and given["clean_augment"].base.contrast == 0.1
