import copy
import math

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader

from monai_mlbseg.engines import (
    GroundTruthMonitor,
    MeanTeacherHandler,
    MetaIterationEvents,
    MetaTrainer,
    stage2_method,
    stage2_terms,
)
from monai_mlbseg.engines.stage2 import (
    STAGE2_TERMS,
    InitialLabels,
    MeanTeacher,
    MeanTeacherTerm,
    MetaWeighting,
    PseudoLabels,
    TwoSteps,
    UniformWeighting,
    ViewConsistencyTerm,
    WeightedStepOnly,
)
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.transforms import PLEViews
from tests.helpers import CountingLoader, corrupt, count_steps, disc_samples, make_trainer, mean_dice


def test_iteration_output_terms_weights_and_teacher():
    trainer = make_trainer(iterations=2)
    weights_seen = []
    trainer.add_event_handler(MetaIterationEvents.WEIGHTS_COMPLETED, lambda e: weights_seen.append(e.state.weight_maps))
    steps = count_steps(trainer)
    trainer.run()
    out = trainer.state.output
    assert set(STAGE2_TERMS) <= set(out)
    assert all(math.isfinite(out[k]) for k in STAGE2_TERMS)
    assert out["weight_initial"] + out["weight_pseudo"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < out["weight_positive_fraction"] <= 1
    assert {"dice_initial_gt", "dice_pseudo_gt", "dice_pred_gt"} <= set(out)
    maps = weights_seen[-1]
    assert maps["weights"].shape == (5, 2, 16, 16) and maps["views"].shape == (5, 1, 16, 16)
    assert torch.all(maps["weights"] >= 0)
    assert steps["n"] == 4, "two optimizer steps (weighted + clean) per iteration"
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    assert set(stage2_terms(out)) >= set(STAGE2_TERMS)


def test_teacher_is_the_ema_of_the_student():
    trainer = make_trainer(iterations=3, mean_teacher=MeanTeacher(decay=0.5))
    history = []

    def remember(engine):
        history.append(copy.deepcopy(engine.network.state_dict()))

    trainer.add_event_handler(MetaIterationEvents.REAL_STEP_COMPLETED, remember)
    trainer.add_event_handler(MetaIterationEvents.CLEAN_STEP_COMPLETED, remember)
    trainer.run()
    # replay the EMA by hand: iteration t (0-based) uses a = min(1 - 1/(t+1), 0.5), twice per iteration
    names = [n for n, _ in trainer.network.named_parameters()]
    expected = {n: history[0][n].clone() for n in names}  # t = 0: a = 0, copy
    for i, state in enumerate(history[1:], start=1):
        a = min(1 - 1 / (i // 2 + 1), 0.5)
        for n in names:
            expected[n] = a * expected[n] + (1 - a) * state[n]
    for n, p in trainer.teacher.named_parameters():
        assert torch.allclose(p, expected[n], atol=1e-6)


def test_teacher_handler_start_copies_only_on_fresh_runs():
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    handler = MeanTeacherHandler(teacher, decay=0.99, student=student)

    class FakeEngine:
        class state:
            iteration = 0

    handler.start(FakeEngine)
    assert torch.equal(teacher.weight, student.weight)
    with torch.no_grad():
        teacher.weight.add_(1.0)
    FakeEngine.state.iteration = 7
    handler.start(FakeEngine)
    assert not torch.equal(teacher.weight, student.weight)
    assert handler.alpha(1) == 0.0 and handler.alpha(2) == 0.5 and handler.alpha(10_000) == 0.99
    with pytest.raises(ValueError, match="decay"):
        MeanTeacherHandler(teacher, decay=1.5)


def test_reweight_off_gives_uniform_weights_and_no_meta_loss():
    trainer = make_trainer(weighting=UniformWeighting())
    trainer.run()
    w = trainer.state.weight_maps["weights"]
    assert torch.allclose(w, torch.full_like(w, 1.0 / w.numel()))
    assert math.isnan(trainer.state.output["loss_meta"])
    assert getattr(trainer.weighting, "lookahead", None) is None


def test_reweight_on_gives_non_uniform_weights():
    trainer = make_trainer()
    trainer.run()
    w = trainer.state.weight_maps["weights"]
    assert w.std() > 0 and w.sum().item() == pytest.approx(1.0, abs=1e-5)


def pseudo_and_own_labels(use_ple):
    """The pseudo labels of one iteration and each view's own thresholded prediction."""
    trainer = make_trainer(sources=[InitialLabels(), PseudoLabels(ensemble=use_ple)], iterations=1)
    seen = {}
    trainer.add_event_handler(
        MetaIterationEvents.PLE_COMPLETED, lambda e: seen.update(pred=e.state.output["pred"].detach().clone())
    )
    trainer.run()
    return trainer.state.weight_maps["sources"]["pseudo"], (torch.sigmoid(seen["pred"]) > 0.5).float()


def test_ple_off_uses_each_views_own_prediction():
    pseudo, own = pseudo_and_own_labels(use_ple=False)
    assert torch.equal(pseudo, own)


def test_ple_on_ensembles_the_views():
    pseudo, own = pseudo_and_own_labels(use_ple=True)
    assert not torch.equal(pseudo, own)


def test_clean_step_teacher_and_pc_switches():
    trainer = make_trainer(schedule=WeightedStepOnly())
    steps = count_steps(trainer)
    trainer.run()
    assert steps["n"] == 2 and math.isnan(trainer.state.output["loss_clean"])
    trainer = make_trainer(terms=[], mean_teacher=None)
    trainer.run()
    assert trainer.teacher is None and trainer.mean_teacher is None
    assert "loss_mt" not in trainer.state.output and "loss_pc" not in trainer.state.output
    trainer = make_trainer(terms=[ViewConsistencyTerm(2.0), MeanTeacherTerm(3.0)])
    trainer.run()
    out = trainer.state.output
    assert out["loss"] == pytest.approx(out["loss_weighted"] + 2.0 * out["loss_pc"] + 3.0 * out["loss_mt"], rel=1e-5)


def test_fast_modes():
    trainer = make_trainer(schedule=TwoSteps(reuse_meta_grad=True))
    steps = count_steps(trainer)
    trainer.run()
    out = trainer.state.output
    assert steps["n"] == 4 and out["loss_clean"] == pytest.approx(out["loss_meta"])
    trainer = make_trainer(weighting=MetaWeighting(meta_params=["nodes.conv0_1", "final"]))
    trainer.run()
    assert math.isfinite(trainer.state.output["loss_meta"])
    with pytest.raises(ValueError, match="reuse_meta_grad"):
        make_trainer(schedule=TwoSteps(reuse_meta_grad=True), weighting=MetaWeighting(meta_params=["final"]))
    with pytest.raises(ValueError, match="reuse_meta_grad"):
        make_trainer(schedule=TwoSteps(reuse_meta_grad=True), weighting=UniformWeighting())


def test_clean_loader_is_cycled_not_rebuilt():
    clean = disc_samples(4, 16, seed=2)
    loader = CountingLoader(DataLoader(clean, batch_size=2, shuffle=False))
    torch.manual_seed(0)
    net = NestedUNet(2, features=(4, 8))
    trainer = MetaTrainer(
        "cpu",
        1,
        DataLoader(corrupt(disc_samples(6, 16, seed=1)), batch_size=1),
        loader,
        net,
        torch.optim.SGD(net.parameters(), lr=0.01),
        **stage2_method("mlbseg"),
    )
    trainer.run()
    assert trainer.state.iteration == 6
    assert loader.iterations == 3, "6 iterations over a 2-batch clean loader re-iterate it 3 times"


def test_no_unlabeled_data_trains_supervised_on_the_clean_set():
    clean = disc_samples(6, 16, seed=3)
    torch.manual_seed(0)
    net = NestedUNet(2, features=(4, 8))
    trainer = MetaTrainer(
        "cpu",
        8,
        DataLoader([], batch_size=1),
        DataLoader(clean, batch_size=2),
        net,
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        **stage2_method("mlbseg"),
    )
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    trainer.run()
    assert trainer.supervised_only and trainer.state.iteration == 8 * 3
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])


def test_unlabeled_batch_without_initial_label_is_rejected():
    samples = [{k: v for k, v in s.items() if k != "label"} for s in disc_samples(2, 16)]
    trainer = make_trainer(unlabeled=samples, iterations=1)
    with pytest.raises(KeyError, match="initial label"):
        trainer.run()


def test_the_views_own_the_dimensions_and_the_label_threshold():
    trainer = make_trainer(views=PLEViews(3, threshold=0.7))
    assert (trainer.spatial_dims, trainer.threshold) == (3, 0.7)
    assert trainer.run_settings["views"]["threshold"] == 0.7
    with pytest.raises(ValueError, match="threshold"):
        PLEViews(2, threshold=1.0)


def test_three_dimensional_stage2_is_a_configuration_change():
    g = torch.Generator().manual_seed(0)
    vols = []
    for i in range(3):
        gt = torch.zeros(1, 12, 12, 12)
        gt[:, 3 + i : 9, 4:10, 3:9] = 1
        vols.append({"image": gt + 0.3 * torch.randn(gt.shape, generator=g), "label": gt.roll(1, 1), "gt": gt})
    torch.manual_seed(0)
    net = NestedUNet(3, features=(2, 4))
    trainer = MetaTrainer(
        "cpu",
        1,
        DataLoader(vols, batch_size=1),
        DataLoader(vols, batch_size=2),
        net,
        torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9),
        views=PLEViews(3),
        **stage2_method("mlbseg"),
    )
    GroundTruthMonitor().attach(trainer)
    trainer.run()
    assert trainer.state.weight_maps["weights"].shape == (5, 2, 12, 12, 12)
    assert all(math.isfinite(trainer.state.output[k]) for k in STAGE2_TERMS)


def supervised_stage1(net, clean, iterations, lr=0.05):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    images = torch.stack([s["image"] for s in clean])
    labels = torch.stack([s["label"] for s in clean])
    for _ in range(iterations):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(images), labels).backward()
        opt.step()
    return opt


def stage1_then_stage2(seed: int) -> tuple[float, float]:
    """Two clean images, 24 unlabeled ones with shifted and noisy initial labels, images of varied gain and offset:
    stage 1 converges on the clean pair but generalises poorly. Returns the test Dice after stage 1 and stage 2."""
    size = 24
    clean = disc_samples(2, size, seed=10, noise=0.45, jitter=True)
    unlabeled = corrupt(disc_samples(24, size, seed=11, noise=0.45, jitter=True), seed=1, shift=2, flip_fraction=0.05)
    test = disc_samples(16, size, seed=12, noise=0.45, jitter=True)
    torch.manual_seed(seed)
    net = NestedUNet(2, features=(4, 8, 16))
    supervised_stage1(net, clean, iterations=100)
    stage1 = mean_dice(net, test)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer = MetaTrainer(
        "cpu",
        2,
        DataLoader(unlabeled, batch_size=1, shuffle=True),
        DataLoader(clean, batch_size=2, shuffle=True),
        net,
        optimizer,
        **stage2_method("mlbseg", grad_clip=1.0),
    )
    trainer.set_random_state(0)
    trainer.run()
    return stage1, mean_dice(net, test)


def test_stage2_improves_over_stage1_with_corrupted_initial_labels():
    # measured over torch seeds 0-5: stage 1 0.28-0.68 (it depends on the initialisation), stage 2 0.71-0.78,
    # a gain for every seed (smallest +0.05)
    results = [stage1_then_stage2(seed) for seed in (0, 1, 2)]
    gains = [s2 - s1 for s1, s2 in results]
    assert all(g > 0.03 for g in gains), results
    assert sum(gains) / len(gains) > 0.1, results


@pytest.mark.parametrize("attached", ["first train handler", "after the trainer is built"])
def test_the_teacher_starts_from_the_weights_a_checkpoint_loader_puts_into_the_student(
    make_trainer, tmp_path, attached
):
    """MONAI Label inserts a ``CheckpointLoader`` first among the train handlers, which loads ``models/model.pt``
    into the student at ``STARTED``; a user may attach one to a built trainer, after the teacher's handlers. Either
    way the teacher must start from the loaded weights, not from the pre-load ones."""
    from ignite.engine import Events
    from monai.handlers import CheckpointLoader

    from monai_mlbseg.networks import NestedUNet

    torch.manual_seed(123)
    current = NestedUNet(2, features=(4, 8)).state_dict()
    torch.save({"network": current}, tmp_path / "model.pt")
    net = NestedUNet(2, features=(4, 8))
    loader = CheckpointLoader(str(tmp_path / "model.pt"), {"network": net}, strict=True)
    handlers = [loader] if attached == "first train handler" else []
    trainer = make_trainer(method="weak_to_strong", net=net, train_handlers=handlers, iterations=1)
    if not handlers:
        loader.attach(trainer)
    started = {}

    def teacher_at_first_iteration(engine):
        started.update({k: v.clone() for k, v in trainer.teacher.state_dict().items()})

    trainer.add_event_handler(Events.ITERATION_STARTED(once=1), teacher_at_first_iteration)
    trainer.run()
    assert started and all(torch.equal(started[k], v) for k, v in current.items()), "the loaded weights"
