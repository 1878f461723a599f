import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from monai_mlbseg.transforms import PLEViews, StrongIntensityAugment, warp_to_views

from .helpers import corrupt, disc_samples
from .test_meta_trainer import count_steps, make_trainer


def assert_one_sgd_step(trainer, net, opt, loss):
    """The trainer's weights equal ``net``'s after one step of ``opt`` on the independently computed ``loss``."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    for p, q in zip(trainer.network.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def warp_from_views_one(x, scale):
    """Undo a centred zoom by ``scale`` of one ``[1, C, H, W]`` map with torch's own grid sampling (zeros outside)."""
    if scale == 1:
        return x
    theta = torch.tensor([[[scale, 0.0, 0.0], [0.0, scale, 0.0]]], dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _batch_norms(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_self_training_on_initial_labels_is_one_plain_bce_step():
    """label_sources=("initial",) without meta weights: the weighted step is a plain mean-BCE SGD step."""
    unlabeled = corrupt(disc_samples(2, 16, seed=1))
    options = dict(reweight=False, use_ple=False, label_sources=("initial",), pc_weight=0.0, mt_weight=0.0)
    trainer = make_trainer(iterations=1, unlabeled=unlabeled, clean_step=False, grad_clip=None, **options)
    net = copy.deepcopy(trainer.network)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer.run()

    views = PLEViews(2).set_random_state(0)
    image, initial = unlabeled[0]["image"][None], unlabeled[0]["label"][None]
    v = views(image)
    loss = F.binary_cross_entropy_with_logits(net(v), warp_to_views(initial, views.params, threshold=0.5))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert trainer.state.output["loss_weighted"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert math.isnan(trainer.state.output["weight_pseudo"])
    assert trainer.state.output["weight_initial"] == pytest.approx(1.0, abs=1e-5)
    for p, q in zip(trainer.network.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_no_label_sources_trains_on_the_regularisers_only():
    """label_sources=(): a mean-teacher baseline; no weighted term, the unlabeled step still moves the student."""
    trainer = make_trainer(iterations=2, reweight=False, label_sources=(), pc_weight=0.0, mt_weight=1.0)
    steps = count_steps(trainer)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    out = trainer.state.output
    assert out["loss_weighted"] == 0.0
    assert math.isnan(out["weight_initial"]) and math.isnan(out["weight_pseudo"])
    assert out["loss"] == pytest.approx(out["loss_mt"], rel=1e-6) and out["loss_mt"] > 0
    assert steps["n"] == 4
    assert trainer.state.weight_maps["weights"].shape[1] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


def test_label_sources_order_and_weights_with_meta_learning():
    trainer = make_trainer(iterations=1, label_sources=("pseudo",))
    trainer.run()
    out = trainer.state.output
    assert math.isnan(out["weight_initial"])
    assert out["weight_pseudo"] == pytest.approx(1.0, abs=1e-5)
    assert trainer.state.weight_maps["weights"].shape == (5, 1, 16, 16)
    assert "weight_initial_when_wrong" not in out


@pytest.mark.parametrize(
    "options",
    [
        {"label_sources": ("initial", "gt")},
        {"label_sources": ("pseudo", "pseudo")},
        {"label_sources": ()},
        {"label_sources": (), "reweight": False, "pc_weight": 0.0, "use_teacher": False},
        {"batch_norm": "eval"},
    ],
)
def test_invalid_label_sources_and_batch_norm_modes_are_refused(options):
    with pytest.raises(ValueError):
        make_trainer(**options)


def test_frozen_batch_norm_keeps_the_stage1_statistics():
    frozen = make_trainer(iterations=2, batch_norm="frozen")
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in _batch_norms(frozen.network)]
    affine = [m.weight.detach().clone() for m in _batch_norms(frozen.network)]
    frozen.run()
    for m, (mean, var) in zip(_batch_norms(frozen.network), stats):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert not m.training
    assert all(not m.training for m in _batch_norms(frozen.teacher))
    assert any(not torch.equal(m.weight, w) for m, w in zip(_batch_norms(frozen.network), affine))
    assert frozen.network.training, "the rest of the student stays in train mode"

    reference = make_trainer(iterations=2)
    stats = [m.running_mean.clone() for m in _batch_norms(reference.network)]
    reference.run()
    assert any(not torch.equal(m.running_mean, s) for m, s in zip(_batch_norms(reference.network), stats))


def test_frozen_batch_norm_makes_a_views_prediction_independent_of_its_batch():
    """With frozen statistics the student's logits of one view do not depend on the other views in the batch."""
    trainer = make_trainer(iterations=1, batch_norm="frozen")
    trainer.run()
    net = trainer.network
    trainer._train_mode()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[:1], net(x[:1]), rtol=1e-5, atol=1e-5)


def test_sign_weighting_weights_every_agreeing_pixel_alike():
    from monai_mlbseg.meta import normalise_weights

    x = torch.tensor([[-2.0, 0.5, 3.0, 0.0, 1e-3]])
    torch.testing.assert_close(normalise_weights(x), torch.tensor([[0.0, 0.5, 3.0, 0.0, 1e-3]]) / 3.501)
    torch.testing.assert_close(normalise_weights(x, weighting="sign"), torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]]) / 3)
    assert torch.equal(normalise_weights(-x.abs(), weighting="sign"), torch.zeros_like(x))
    with pytest.raises(ValueError, match="weighting"):
        normalise_weights(x, weighting="cosine")


def test_sign_meta_weighting_in_the_trainer_uses_the_same_meta_gradient():
    """Both weightings are functions of one raw map: the sign weights are its positive support, normalised."""
    maps = {}
    for weighting in ("gradient", "sign"):
        trainer = make_trainer(iterations=1, meta_weighting=weighting)
        trainer.run()
        maps[weighting] = trainer.state.weight_maps["weights"]
    support = (maps["gradient"] > 0).float()
    torch.testing.assert_close(maps["sign"], support / support.sum())
    assert float(maps["sign"].sum()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="meta_weighting"):
        make_trainer(meta_weighting="cosine", reweight=False)


@pytest.mark.parametrize("method", ["mlbseg", "mean_teacher", "weak_to_strong", "self_training"])
def test_named_stage2_methods_set_their_options_and_train(method):
    from monai_mlbseg.engines import STAGE2_METHODS, stage2_method_options

    options = stage2_method_options(method)
    table = STAGE2_METHODS[method]
    assert {k: v for k, v in options.items() if k != "student_augment"} == {
        k: v for k, v in table.items() if k != "student_augment"
    }
    augment = options["student_augment"]
    assert (augment is None) == (table["student_augment"] is None)
    if augment is not None:
        assert isinstance(augment, StrongIntensityAugment)
        assert {k: getattr(augment, k) for k in table["student_augment"]} == table["student_augment"]
    json.dumps(table)  # JSON-compatible, for configs and result files
    options["label_sources"].append("x")
    assert "x" not in STAGE2_METHODS[method]["label_sources"], "a copy: changing it leaves the table alone"
    trainer = make_trainer(iterations=1, **stage2_method_options(method))
    steps = count_steps(trainer)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    out = trainer.state.output
    assert (trainer.lookahead is not None) == (method == "mlbseg")
    assert math.isnan(out["loss_meta"]) == (method != "mlbseg")
    assert (out["loss_weighted"] == 0.0) == (method in ("mean_teacher", "weak_to_strong"))
    assert steps["n"] == (1 if method == "weak_to_strong" else 2), "weak_to_strong makes one joint step"
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    with pytest.raises(ValueError, match="unknown stage-2 method 'ssl'"):
        stage2_method_options("ssl")


def test_copy_paste_term_is_one_plain_bce_step_on_the_mixed_views(monkeypatch):
    """mix_weight: BCE on unlabeled views with a box of a clean view pasted in, against the mixed label."""
    import monai_mlbseg.engines.meta_trainer as meta_trainer_module

    def left_half(num, spatial_shape, fraction, generator=None, device="cpu"):
        box = torch.zeros(num, 1, *spatial_shape, device=device)
        box[..., : spatial_shape[-1] // 2] = 1.0
        return box

    monkeypatch.setattr(meta_trainer_module, "random_box_masks", left_half)
    unlabeled = corrupt(disc_samples(2, 16, seed=1))
    clean = disc_samples(2, 16, seed=2)
    options = dict(reweight=False, use_ple=False, label_sources=(), pc_weight=0.0, use_teacher=False, mix_weight=2.0)
    trainer = make_trainer(iterations=1, unlabeled=unlabeled, clean=clean, clean_step=False, grad_clip=None, **options)
    net = copy.deepcopy(trainer.network)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer.run()

    views = PLEViews(2).set_random_state(0)
    v = views(unlabeled[0]["image"][None])
    pseudo = (torch.sigmoid(net(v)) > 0.5).float()  # the student's own prediction (no PLE, no teacher)
    clean_images = torch.stack([c["image"] for c in clean])
    vc = views(clean_images)
    vc_labels = warp_to_views(torch.stack([c["label"] for c in clean]), views.params, threshold=0.5)
    box = left_half(v.shape[0], v.shape[2:], 2 / 3)
    pick = torch.arange(v.shape[0]) % vc.shape[0]
    mixed, target = box * vc[pick] + (1 - box) * v, box * vc_labels[pick] + (1 - box) * pseudo
    loss = F.binary_cross_entropy_with_logits(net(mixed), target)
    assert trainer.state.output["loss_mix"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert trainer.state.output["loss"] == pytest.approx(2.0 * float(loss.detach()), rel=1e-5)
    assert_one_sgd_step(trainer, net, opt, 2.0 * loss)


def test_copy_paste_term_with_meta_weights_and_its_errors():
    trainer = make_trainer(iterations=2, mix_weight=1.0)
    trainer.run()
    out = trainer.state.output
    assert out["loss_mix"] > 0 and math.isfinite(out["loss_meta"])
    assert out["loss"] == pytest.approx(
        out["loss_weighted"] + out["loss_pc"] + out["loss_mt"] + out["loss_mix"], rel=1e-5
    )
    plain = make_trainer(iterations=1)
    plain.run()
    assert plain.state.output["loss_mix"] == 0.0, "off by default (the reference)"
    with pytest.raises(ValueError, match="mix_fraction"):
        make_trainer(mix_weight=1.0, mix_fraction=1.5)
    with pytest.raises(ValueError, match="mix_weight"):
        make_trainer(mix_weight=-1.0)
    only_mix = make_trainer(
        iterations=1, reweight=False, label_sources=(), pc_weight=0.0, mt_weight=0.0, mix_weight=1.0
    )
    only_mix.run()
    assert only_mix.state.output["loss"] == pytest.approx(only_mix.state.output["loss_mix"], rel=1e-6)


def test_weak_to_strong_is_one_confident_pseudo_label_step_on_the_augmented_views():
    """student_augment + mt_confidence: the student sees augment(views), the teacher the views themselves."""
    unlabeled = corrupt(disc_samples(2, 16, seed=1))

    def augment(x):
        return 0.6 * x + 0.3

    options = dict(reweight=False, label_sources=(), pc_weight=0.0, mt_weight=1.5, teacher_noise=0.0)
    trainer = make_trainer(
        iterations=1,
        unlabeled=unlabeled,
        clean_step=False,
        grad_clip=None,
        student_augment=augment,
        mt_confidence=0.55,
        **options,
    )
    net, teacher = copy.deepcopy(trainer.network), copy.deepcopy(trainer.teacher)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output["image"]))
    trainer.run()

    views = PLEViews(2).set_random_state(0)
    v = views(unlabeled[0]["image"][None])
    with torch.no_grad():
        t = torch.sigmoid(teacher(v))
    sure = (torch.maximum(t, 1 - t) >= 0.55).float()
    assert 0 < sure.mean() < 1, "the test needs confident and unsure pixels"
    bce = F.binary_cross_entropy_with_logits(net(augment(v)), (t > 0.5).float(), reduction="none")
    loss = 1.5 * (bce * sure).sum() / bce.numel()
    assert trainer.state.output["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    torch.testing.assert_close(seen[0], augment(v))
    assert_one_sgd_step(trainer, net, opt, loss)


def test_teacher_ensemble_targets_the_ple_mean_of_the_teachers_views():
    """teacher_ensemble: L_mt's target is the teacher's view predictions mapped back, averaged and warped back."""
    unlabeled = corrupt(disc_samples(2, 16, seed=1))
    options = dict(reweight=False, label_sources=(), pc_weight=0.0, teacher_noise=0.0, mt_confidence=0.55)
    trainer = make_trainer(
        iterations=1, unlabeled=unlabeled, clean_step=False, grad_clip=None, teacher_ensemble=True, **options
    )
    assert trainer.run_settings["teacher_ensemble"] is True
    net, teacher = copy.deepcopy(trainer.network), copy.deepcopy(trainer.teacher)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer.run()

    views = PLEViews(2).set_random_state(0)
    v = views(unlabeled[0]["image"][None])
    params = views.params
    with torch.no_grad():
        t_views = torch.sigmoid(teacher(v))
    # independent PLE mean: undo each view's flip, then its zoom (a centred crop-and-resize), one view at a time
    back = []
    for k in range(params.num_views):
        x = t_views[k : k + 1]
        flips = [d + 2 for d in range(2) if bool(params.flips.reshape(-1, 2)[k, d])]
        x = torch.flip(x, flips) if flips else x
        back.append(warp_from_views_one(x, float(params.scales.reshape(-1)[k])))
    mean = torch.stack(back).mean(0)
    t = warp_to_views(mean, params)
    sure = (torch.maximum(t, 1 - t) >= 0.55).float()
    assert 0 < sure.mean() < 1, "the test needs confident and unsure pixels"
    assert not torch.allclose(t, t_views, atol=1e-3), "the ensemble differs from the views' own predictions"
    bce = F.binary_cross_entropy_with_logits(net(v), (t > 0.5).float(), reduction="none")
    loss = (bce * sure).sum() / bce.numel()
    assert trainer.state.output["loss_mt"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert_one_sgd_step(trainer, net, opt, loss)
    off = make_trainer(iterations=1)
    assert off.run_settings["teacher_ensemble"] is False, "off by default (the reference)"


def _clip(grads, max_norm):
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    return [g * min(1.0, max_norm / (float(norm) + 1e-6)) for g in grads]


@pytest.mark.parametrize("per_term", [True, False])
def test_clip_per_term_clips_the_clean_and_the_unlabeled_gradient_apart(per_term):
    """clip_per_term: a joint step adds the clean gradient and the unlabeled one, each clipped on its own."""
    unlabeled = corrupt(disc_samples(2, 16, seed=1))
    clean = disc_samples(2, 16, seed=2)
    options = dict(reweight=False, use_ple=False, label_sources=("initial",), pc_weight=0.0, mt_weight=0.0)
    trainer = make_trainer(
        iterations=1,
        unlabeled=unlabeled,
        clean=clean,
        joint_step=True,
        grad_clip=0.05,
        clip_per_term=per_term,
        **options,
    )
    assert trainer.run_settings["clip_per_term"] is per_term
    net = copy.deepcopy(trainer.network)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer.run()

    views = PLEViews(2).set_random_state(0)
    v = views(unlabeled[0]["image"][None])
    initial = warp_to_views(unlabeled[0]["label"][None], views.params, threshold=0.5)
    vc = views(torch.stack([c["image"] for c in clean]))
    vc_labels = warp_to_views(torch.stack([c["label"] for c in clean]), views.params, threshold=0.5)
    params = list(net.parameters())
    unl = F.binary_cross_entropy_with_logits(net(v), initial)
    cln = F.binary_cross_entropy_with_logits(net(vc), vc_labels)
    assert trainer.state.output["loss"] == pytest.approx(float((unl + cln).detach()), rel=1e-5)
    g_unl = torch.autograd.grad(unl, params, retain_graph=True)
    g_cln = torch.autograd.grad(cln, params, retain_graph=True)
    summed = [a + b for a, b in zip(g_unl, g_cln)]
    apart = [a + b for a, b in zip(_clip(g_unl, 0.05), _clip(g_cln, 0.05))]
    grads = apart if per_term else _clip(summed, 0.05)
    assert max(float((a - b).abs().max()) for a, b in zip(apart, _clip(summed, 0.05))) > 1e-4, "the two clips differ"
    for p, g in zip(params, grads):
        p.grad = g.float()
    opt.step()
    for p, q in zip(trainer.network.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="clip_per_term=True .* needs joint_step=True"):
        make_trainer(clip_per_term=True)


def test_weak_to_strong_keeps_the_squared_term_on_the_clean_views_and_refuses_a_bad_confidence():
    trainer = make_trainer(iterations=1, mt_confidence=0.9, student_augment=lambda x: x + 0.1)
    assert type(trainer.mt_loss).__name__ == "MeanTeacherLoss"
    assert type(trainer.unlabeled_mt_loss).__name__ == "ConfidentPseudoLabelLoss"
    trainer.run()
    assert math.isfinite(trainer.state.output["loss_meta"]), "the look-ahead runs on the student's views"
    with pytest.raises(ValueError, match="threshold must lie in"):
        make_trainer(iterations=1, mt_confidence=0.2)


def test_clean_augment_is_what_the_student_sees_of_the_clean_views():
    """clean_augment: labeled-only training is one BCE step on augment(views); the clean step's forward likewise."""
    clean = disc_samples(2, 16, seed=2)

    def augment(x):
        return 0.5 * x + 0.2

    options = dict(pc_weight=0.0, use_teacher=False, grad_clip=None, clean_augment=augment)
    trainer = make_trainer(iterations=1, unlabeled=[], clean=clean, **options)
    net = copy.deepcopy(trainer.network)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer.run()
    views = PLEViews(2).set_random_state(0)
    v = views(torch.stack([c["image"] for c in clean]))
    labels = warp_to_views(torch.stack([c["label"] for c in clean]), views.params, threshold=0.5)
    loss = F.binary_cross_entropy_with_logits(net(augment(v)), labels)
    assert trainer.state.output["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert_one_sgd_step(trainer, net, opt, loss)

    inputs = []
    trainer = make_trainer(iterations=1, clean=clean, reweight=False, label_sources=(), clean_augment=augment)
    trainer.network.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    trainer.run()
    views = PLEViews(2).set_random_state(0)
    views(torch.rand(1, 1, 16, 16))  # the unlabeled image's draw comes first
    v = views(torch.stack([c["image"] for c in clean]))
    assert any(x.shape == v.shape and torch.allclose(x, augment(v)) for x in inputs)
    assert not any(x.shape == v.shape and torch.allclose(x, v) for x in inputs)


def test_strong_augments_are_seeded_by_the_trainer():
    def run():
        trainer = make_trainer(
            iterations=1,
            reweight=False,
            label_sources=(),
            student_augment=StrongIntensityAugment(),
            clean_augment=StrongIntensityAugment(),
        )
        trainer.run()
        return trainer.student_augment.scale.copy(), trainer.clean_augment.scale.copy(), trainer.state.output["loss"]

    first, second = run(), run()
    assert first[2] == second[2]
    assert (first[0] == second[0]).all() and (first[1] == second[1]).all()
    assert not (first[0][:1] == first[1][:1]).all(), "the two augments draw from differently seeded generators"
