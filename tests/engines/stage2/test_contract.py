"""The declared stage-2 contract: parts see the iteration's context or the host protocol, never the trainer."""

import ast
from pathlib import Path

import pytest
import torch
from monai.engines.utils import IterationEvents
from monai.transforms import Randomizable, Transform

import monai_mlbseg.engines as engines
from monai_mlbseg.engines import MetaTrainer, stage2_method
from monai_mlbseg.engines.stage2 import MeanTeacher, Stage2Host
from monai_mlbseg.transforms.traits import PixelMovingTrait

PACKAGE = Path(engines.__file__).resolve().parents[1]
#: the modules of parts: every stage-2 module but the engine itself, and the experimental parts
PART_MODULES = sorted(
    [p for p in (PACKAGE / "engines" / "stage2").glob("*.py") if p.name not in ("trainer.py", "__init__.py")]
    + list((PACKAGE / "experimental").glob("*.py"))
)


@pytest.mark.parametrize("path", PART_MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_part_names_the_trainer_or_reaches_a_private_member(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any("trainer" in n.lower() for n in names), f"{path.name} imports {names}"
        if isinstance(node, ast.Name):
            assert node.id != "MetaTrainer", f"{path.name}:{node.lineno} names MetaTrainer"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("host", "ctx"):
            assert not node.attr.startswith("_"), f"{path.name}:{node.lineno} reaches {node.value.id}.{node.attr}"
            assert node.attr != "trainer", f"{path.name}:{node.lineno} reaches the trainer through the context"


def test_the_trainer_implements_the_declared_host_protocol(make_trainer):
    trainer = make_trainer(iterations=1)
    assert isinstance(trainer, Stage2Host)
    declared = {n for n in vars(Stage2Host) if not n.startswith("_")} | set(Stage2Host.__annotations__)
    assert all(hasattr(trainer, n) for n in declared), sorted(n for n in declared if not hasattr(trainer, n))


class Shift(Randomizable, Transform, PixelMovingTrait):
    """A perturbation that moves pixels (a CutMix-like idea) declared by its trait alone: every view one pixel right."""

    def __call__(self, views):
        return torch.roll(views, 1, dims=-1)

    def targets(self, tensor):
        return torch.roll(tensor, 1, dims=-1)


def test_a_new_pixel_moving_perturbation_moves_the_teachers_targets_with_no_engine_change(make_trainer):
    trainer = make_trainer(
        iterations=1, method="weak_to_strong", student_augment=Shift(), mean_teacher=MeanTeacher(noise=0)
    )
    seen = {}

    def check(engine: MetaTrainer):
        ctx = engine.state.stage2
        with torch.no_grad():
            teacher = torch.sigmoid(engine.mean_teacher.module(ctx.unlabeled.views))
        seen["student"] = torch.equal(ctx.student_views, torch.roll(ctx.unlabeled.views, 1, dims=-1))
        seen["error"] = float((ctx.teacher_probs() - torch.roll(teacher, 1, dims=-1)).abs().max())
        seen["unmoved"] = float((ctx.teacher_probs() - teacher).abs().max())

    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, check)
    trainer.run()
    assert seen["student"], "the student saw the shifted views"
    assert seen["error"] < 1e-5 < seen["unmoved"], "the teacher's targets moved with the pixels, as declared"


def test_the_engine_exports_a_small_public_surface():
    assert len(engines.__all__) <= 24 and "stage2" in engines.__all__
    assert all(hasattr(engines, n) for n in engines.__all__)
    assert stage2_method("weak_to_strong")["schedule"].grad_clip is None  # the scalars live in their parts
