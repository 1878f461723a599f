"""The one training recipe: drivers describe a run by the bundle's top-level ids, and budgets are optimizer steps."""

import pytest

from monai_mlbseg.engines.stage2 import JointStep, LabeledOnly, TwoSteps
from monai_mlbseg.recipe import (
    TRAINING_STEPS,
    TrainingRun,
    iterations_for_steps,
    parsed,
    stage_epoch_length,
    stage_epochs,
    training_workflow,
)


def test_a_driver_may_set_only_top_level_ids_and_a_user_any(la_run):
    with pytest.raises(ValueError, match=r"top-level.*\['stage1#batch_size', 'train#trainer#max_epochs'\]"):
        training_workflow(la_run["bundle"], {"train#trainer#max_epochs": 3, "stage1#batch_size": 2, "lr": 0.1})
    ours = {**la_run["ids"], "stage1_batch_size": 2}
    workflow = training_workflow(la_run["bundle"], ours, user_overrides={"stage1#batch_size": 3})
    assert parsed(workflow, "stage1#batch_size") == 3, "the user's own override wins"
    assert list(workflow.parser["training"]) == [f"@{id}" for id in TRAINING_STEPS.values()], "steps have ids"


@pytest.mark.parametrize(
    "method, steps, iterations", [("weak_to_strong", 7, 7), ("mlbseg", 7, 3), ("labeled_only", 7, 7)]
)
def test_stage2_budgets_are_optimizer_steps_converted_in_the_bundle(la_run, method, steps, iterations):
    overrides = {**la_run["ids"], "stage2_method": method, "stage2_steps": steps}
    overrides.update(stage1_iterations=5, max_epoch_length=2)
    workflow = training_workflow(la_run["bundle"], overrides)
    trainer, stage1 = parsed(workflow, "train#trainer"), parsed(workflow, "stage1#trainer")
    assert trainer.state.epoch_length * trainer.state.max_epochs == iterations + iterations % 2, "whole epochs of 2"
    assert trainer.state.epoch_length == min(2, iterations)
    assert (stage1.state.epoch_length, stage1.state.max_epochs) == (2, 3), "5 iterations in epochs of at most 2"


def test_the_conversions():
    assert iterations_for_steps(TwoSteps(), 10) == 5 and iterations_for_steps(JointStep(), 10) == 10
    assert iterations_for_steps(LabeledOnly(), 3) == 3 and iterations_for_steps(TwoSteps(), 1) == 1
    assert iterations_for_steps(TwoSteps(), None) is None
    assert (stage_epochs(None, 50, 120), stage_epoch_length(None, 50)) == (120, None), "the bundle's own lengths"
    assert (stage_epochs(150, 50, 7), stage_epoch_length(150, 50)) == (3, 50)
    assert (stage_epochs(120, 50, 7), stage_epoch_length(120, 50)) == (3, 50), "whole epochs: at least 120"


def test_a_run_refuses_an_unknown_step(la_run):
    run = TrainingRun(la_run["bundle"], la_run["ids"], seed=3)
    assert run.get("seed") == 3
    with pytest.raises(ValueError, match="unknown training steps"):
        run.run(["stage 3"])
