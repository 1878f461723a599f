"""Label sources are a hook: a third source is one small subclass; the iteration's phases are profiler ranges."""

import math

import pytest
import torch
import torch.nn.functional as F

from monai_mlbseg.engines import stage2_terms
from monai_mlbseg.engines.stage2 import (
    STAGE2_PHASES,
    STAGE2_TERMS,
    InitialLabels,
    LabelSource,
    PseudoLabels,
    UniformWeighting,
)
from tests.helpers import make_trainer


class SmoothedPredictionSource(LabelSource):
    """A third label source: the student's prediction, smoothed over 3 x 3 pixels and thresholded."""

    name = "smoothed"

    def __call__(self, ctx):
        smoothed = F.avg_pool2d(ctx.probs.detach(), 3, stride=1, padding=1)
        return (smoothed > ctx.threshold).float()


def test_a_third_label_source_is_weighed_and_trained_on():
    trainer = make_trainer(iterations=2, sources=[InitialLabels(), PseudoLabels(), SmoothedPredictionSource()])
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    out, maps = trainer.state.output, trainer.state.weight_maps
    assert list(maps["sources"]) == ["initial", "pseudo", "smoothed"]
    assert maps["weights"].shape == (5, 3, 16, 16) and maps["sources"]["smoothed"].shape == (5, 1, 16, 16)
    assert set(STAGE2_TERMS) | {"weight_smoothed"} <= set(stage2_terms(out))
    assert out["weight_smoothed"] > 0, "the look-ahead weighs the new source"
    total = out["weight_initial"] + out["weight_pseudo"] + out["weight_smoothed"]
    assert total == pytest.approx(1.0, abs=1e-5)
    assert all(math.isfinite(out[k]) for k in STAGE2_TERMS)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


def test_a_subclass_source_replaces_the_selection_without_meta_weights():
    trainer = make_trainer(
        iterations=1, sources=[PseudoLabels(), SmoothedPredictionSource()], weighting=UniformWeighting()
    )
    trainer.run()
    out = trainer.state.output
    assert list(trainer.state.weight_maps["sources"]) == ["pseudo", "smoothed"]
    assert "weight_initial" not in out
    assert out["weight_pseudo"] == pytest.approx(0.5) and out["weight_smoothed"] == pytest.approx(0.5)


def test_every_phase_is_a_profiler_range():
    trainer = make_trainer(iterations=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.run()
    names = {event.name for event in prof.events()}
    assert {f"mlbseg.{phase}" for phase in STAGE2_PHASES} <= names
    assert STAGE2_PHASES == ("views", "label_sources", "unlabeled_terms", "weight_maps", "weighted_step", "clean_step")
