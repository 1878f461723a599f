"""The number of unlabeled images per stage-2 iteration (`unlabeled_batch_size`) and the joint weight normalisation."""

import pytest
import torch
from monai.bundle import ConfigParser

from monai_mlbseg.engines import MetaIterationEvents
from monai_mlbseg.meta import MetaLookAhead
from monai_mlbseg.networks import NestedUNet
from tests.bundle_utils import BUNDLES
from tests.helpers import make_trainer


def bundle_batch_size(name: str, *configs: str, loader: str = "train#unlabeled#dataloader", **override) -> int:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES[name] / "configs" / c) for c in configs])
    for key, value in override.items():
        parser[key] = value
    return parser.get_parsed_content(f"{loader}#batch_size")


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_the_unlabeled_loader_takes_unlabeled_batch_size(name):
    assert bundle_batch_size(name, "train.json") == 1, "the reference: one unlabeled slice per iteration"
    assert bundle_batch_size(name, "train.json", unlabeled_batch_size=4) == 4


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_the_clean_loader_of_stage_2_takes_clean_batch_size(name):
    assert bundle_batch_size(name, "train.json", loader="train#dataloader") == 2, "the reference: two clean slices"
    assert bundle_batch_size(name, "train.json", loader="train#dataloader", clean_batch_size=32) == 32
    parser = ConfigParser()
    parser.read_config(str(BUNDLES[name] / "configs" / "train.json"))
    assert parser["train"]["trainer"]["clean_data_loader"] == "@train#dataloader"


def run_with_weights(trainer):
    seen = []
    trainer.add_event_handler(MetaIterationEvents.WEIGHTS_COMPLETED, lambda e: seen.append(e.state.weight_maps))
    trainer.run()
    return seen


def test_unlabeled_batch_one_reproduces_the_single_image_iteration():
    """The option at 1 (the bundles' default) is the trainer's single-image path, bit for bit."""
    reference = make_trainer(iterations=2)
    reference_maps = run_with_weights(reference)
    configured = make_trainer(iterations=2, unlabeled_batch_size=bundle_batch_size("mlbseg_la", "train.json"))
    configured_maps = run_with_weights(configured)
    for a, b in zip(reference.network.state_dict().values(), configured.network.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(reference_maps, configured_maps):
        assert torch.equal(a["weights"], b["weights"]) and a["weights"].shape[0] == 5


def test_unlabeled_batch_two_normalises_the_weights_jointly():
    trainer = make_trainer(iterations=2, unlabeled_batch_size=2)
    maps = run_with_weights(trainer)
    assert trainer.state.iteration == 2
    for m in maps:
        weights = m["weights"]
        assert weights.shape == (10, 2, 16, 16) and m["views"].shape == (10, 1, 16, 16)
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-5), "one normalisation over the whole batch"
        per_image = weights.reshape(2, 5, -1).sum(dim=(1, 2))
        assert torch.all(per_image > 0) and torch.all(per_image < 1 - 1e-3), "not one normalisation per image"


def test_joint_normalisation_of_a_batch_is_the_concatenation_of_its_images_raw_maps():
    """With batch statistics out of play (eval-mode BatchNorm, no regulariser), each image's raw meta-gradient map
    does not depend on the other images of its batch, and the batch's weights are those maps normalised together."""
    torch.manual_seed(0)
    net = NestedUNet(2, features=(4, 8)).eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    lookahead = MetaLookAhead(net, opt)
    images = torch.rand(2, 1, 16, 16)
    labels = [(torch.rand(2, 1, 16, 16) > 0.5).float() for _ in range(2)]
    clean, clean_labels = torch.rand(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float()
    batch = lookahead(images, labels, clean, clean_labels)
    singles = [lookahead(images[i : i + 1], [y[i : i + 1] for y in labels], clean, clean_labels) for i in range(2)]
    raw = torch.cat([s.neg_meta_grad for s in singles])
    torch.testing.assert_close(batch.neg_meta_grad, raw, rtol=1e-4, atol=1e-7)
    positive = raw.clamp_min(0)
    torch.testing.assert_close(batch.weights, positive / positive.sum(), rtol=1e-4, atol=1e-8)
    shares = batch.weights.flatten(1).sum(1)
    assert float(shares.sum()) == pytest.approx(1.0, abs=1e-5) and torch.all(shares < 1)
