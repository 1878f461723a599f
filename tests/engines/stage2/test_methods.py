import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from monai_mlbseg.engines import STAGE2_METHODS, stage2_method
from monai_mlbseg.engines.stage2 import (
    ConfidenceWeighting,
    InitialLabels,
    JointStep,
    LabeledOnly,
    MeanTeacher,
    MeanTeacherTerm,
    MetaWeighting,
    PseudoLabels,
    TeacherLabels,
    TwoSteps,
    UniformWeighting,
    ViewConsistencyTerm,
    WeightedStepOnly,
)
from monai_mlbseg.experimental import (
    CopyPasteTerm,
    EnsembleMeanTeacherTerm,
    PerTermClippedJointStep,
    SignMetaWeighting,
    freeze_batch_norm,
)
from monai_mlbseg.losses import ConfidentPseudoLabelLoss, MeanTeacherLoss, ViewConsistencyLoss
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.transforms import PLEViews, StrongIntensityAugment, warp_to_views
from tests.helpers import corrupt, count_steps, disc_samples, make_trainer


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


def ple_mean_one(view_probs, params):
    """Independent PLE mean of one image's views: undo each view's flip, then its zoom, one view at a time; average."""
    back = []
    for k in range(params.num_views):
        x = view_probs[k : k + 1]
        flips = [d + 2 for d in range(2) if bool(params.flips.reshape(-1, 2)[k, d])]
        x = torch.flip(x, flips) if flips else x
        back.append(warp_from_views_one(x, float(params.scales.reshape(-1)[k])))
    return torch.stack(back).mean(0)


def _batch_norms(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_self_training_on_initial_labels_is_one_plain_bce_step():
    """Initial labels as the only source, uniform weights: the weighted step is a plain mean-BCE SGD step."""
    unlabeled = corrupt(disc_samples(2, 16, seed=1))
    trainer = make_trainer(
        iterations=1,
        unlabeled=unlabeled,
        method=None,
        sources=[InitialLabels()],
        weighting=UniformWeighting(),
        schedule=WeightedStepOnly(),
        grad_clip=None,
    )
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
    assert "weight_pseudo" not in trainer.state.output, "no pseudo-label source, no weight entry"
    assert trainer.state.output["weight_initial"] == pytest.approx(1.0, abs=1e-5)
    for p, q in zip(trainer.network.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_no_label_sources_trains_on_the_regularisers_only():
    """No label sources: a mean-teacher baseline; no weighted term, the unlabeled step still moves the student."""
    trainer = make_trainer(iterations=2, method=None, terms=[MeanTeacherTerm(1.0)], mean_teacher=MeanTeacher())
    steps = count_steps(trainer)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    out = trainer.state.output
    assert out["loss_weighted"] == 0.0
    assert "weight_initial" not in out and "weight_pseudo" not in out
    assert out["loss"] == pytest.approx(out["loss_mt"], rel=1e-6) and out["loss_mt"] > 0
    assert steps["n"] == 4
    assert trainer.state.weight_maps["weights"].shape[1] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


def test_label_sources_order_and_weights_with_meta_learning():
    trainer = make_trainer(iterations=1, sources=[PseudoLabels()])
    trainer.run()
    out = trainer.state.output
    assert "weight_initial" not in out
    assert out["weight_pseudo"] == pytest.approx(1.0, abs=1e-5)
    assert trainer.state.weight_maps["weights"].shape == (5, 1, 16, 16)
    assert "weight_initial_when_wrong" not in out


@pytest.mark.parametrize(
    "options, error",
    [
        # an unknown source name ("gt") is unrepresentable: a source is a LabelSource object, anything else is refused
        pytest.param(lambda: {"sources": [InitialLabels(), "gt"]}, TypeError, id="not-a-label-source"),
        pytest.param(lambda: {"sources": [PseudoLabels(), PseudoLabels()]}, ValueError, id="repeated-source"),
        pytest.param(lambda: {"sources": []}, ValueError, id="meta-weighting-without-sources"),
        pytest.param(
            lambda: {"sources": [], "weighting": UniformWeighting(), "terms": [], "mean_teacher": None},
            ValueError,
            id="nothing-acts-on-the-unlabeled-views",
        ),
        # batch_norm modes are gone (freeze_batch_norm is the only mode): the old keyword is refused
        pytest.param(lambda: {"batch_norm": "eval"}, TypeError, id="batch-norm-keyword-gone"),
    ],
)
def test_invalid_label_sources_and_batch_norm_modes_are_refused(options, error):
    with pytest.raises(error):
        make_trainer(**options())


def _frozen_net(seed=0):
    torch.manual_seed(seed)
    net = NestedUNet(2, features=(4, 8))
    assert freeze_batch_norm(net) is net
    return net


def test_frozen_batch_norm_keeps_the_stage1_statistics():
    frozen = make_trainer(iterations=2, net=_frozen_net())
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
    trainer = make_trainer(iterations=1, net=_frozen_net())
    trainer.run()
    net = trainer.network
    net.train()  # what the trainer does at every iteration
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
    for name, weighting in (("gradient", MetaWeighting()), ("sign", SignMetaWeighting())):
        trainer = make_trainer(iterations=1, weighting=weighting)
        trainer.run()
        maps[name] = trainer.state.weight_maps["weights"]
    support = (maps["gradient"] > 0).float()
    torch.testing.assert_close(maps["sign"], support / support.sum())
    assert float(maps["sign"].sum()) == pytest.approx(1.0, abs=1e-5)

    class CosineMetaWeighting(MetaWeighting):
        rule = "cosine"

    with pytest.raises(ValueError, match="weighting"):
        make_trainer(weighting=CosineMetaWeighting())


def _composition(parts):
    """The kinds of a method's parts, comparable with ``==``."""
    return {
        "sources": [type(s) for s in parts["sources"]],
        "terms": [(type(t), t.weight, type(getattr(t, "loss", None))) for t in parts["terms"]],
        "weighting": type(parts["weighting"]),
        "schedule": type(parts["schedule"]),
        "mean_teacher": type(parts["mean_teacher"]),
        "student_augment": type(parts["student_augment"]),
        "clean_augment": type(parts["clean_augment"]),
        "grad_clip": parts["schedule"].grad_clip,
    }


_NONE = type(None)
_PC, _MT = (ViewConsistencyTerm, 1.0, ViewConsistencyLoss), (MeanTeacherTerm, 1.0, MeanTeacherLoss)
_SQUARED_TEACHER = dict(weighting=UniformWeighting, schedule=TwoSteps, mean_teacher=MeanTeacher, grad_clip=0.2)
_NO_AUGMENT = dict(student_augment=_NONE, clean_augment=_NONE)
_WEAK_TO_STRONG = dict(
    schedule=JointStep,
    mean_teacher=MeanTeacher,
    student_augment=StrongIntensityAugment,
    clean_augment=_NONE,
    grad_clip=None,
)
EXPECTED_METHODS = {
    "mlbseg": dict(
        sources=[InitialLabels, PseudoLabels],
        terms=[_PC, _MT],
        weighting=MetaWeighting,
        schedule=TwoSteps,
        mean_teacher=MeanTeacher,
        grad_clip=0.2,
        **_NO_AUGMENT,
    ),
    "weak_to_strong": dict(sources=[TeacherLabels], terms=[], weighting=ConfidenceWeighting, **_WEAK_TO_STRONG),
    "mean_teacher": dict(sources=[], terms=[_MT], **_SQUARED_TEACHER, **_NO_AUGMENT),
    "self_training": dict(
        sources=[InitialLabels],
        terms=[],
        weighting=UniformWeighting,
        schedule=TwoSteps,
        mean_teacher=_NONE,
        grad_clip=0.2,
        **_NO_AUGMENT,
    ),
    "labeled_only": dict(sources=[], terms=[_PC, _MT], **{**_SQUARED_TEACHER, "schedule": LabeledOnly}, **_NO_AUGMENT),
}


def test_every_named_method_has_an_expected_composition():
    assert set(EXPECTED_METHODS) == set(STAGE2_METHODS)


@pytest.mark.parametrize("method", list(STAGE2_METHODS))
def test_named_stage2_methods_set_their_options_and_train(method):
    first, second = stage2_method(method), stage2_method(method)
    assert set(first) == {
        "sources",
        "terms",
        "weighting",
        "schedule",
        "mean_teacher",
        "student_augment",
        "clean_augment",
    }, "every method sets every part, so that switching methods switches all of them"
    assert _composition(first) == EXPECTED_METHODS[method]
    # the parameters of the parts
    if first["mean_teacher"] is not None:
        teacher = first["mean_teacher"]
        assert (teacher.module, teacher.decay, teacher.noise) == (None, 0.99, 0.02)
    if method == "mlbseg":
        assert first["sources"][1].ensemble is True and first["weighting"].meta_params is None
        assert first["schedule"].reuse_meta_grad is False
    if method == "weak_to_strong":
        assert first["weighting"].threshold == 0.95
        augment = first["student_augment"]
        assert (augment.contrast, augment.shift, augment.noise_std, augment.blur_prob) == (0.25, 0.2, 0.08, 0.5)
    # fresh parts: two calls share no object, so changing one leaves the other (and the registry) alone
    for key in first:
        a, b = first[key], second[key]
        if isinstance(a, list):
            assert a is not b and all(p is not q for p, q in zip(a, b)), key
        elif a is not None and not isinstance(a, (bool, int, float)):
            assert a is not b, key
    net = torch.nn.Linear(1, 1)
    with_teacher = stage2_method(method, teacher=net)["mean_teacher"]
    assert with_teacher is None or with_teacher.module is net
    clipped = stage2_method(method, grad_clip=0.5)["schedule"]
    assert (type(clipped), clipped.grad_clip) == (type(first["schedule"]), 0.5)
    assert first["schedule"].grad_clip == EXPECTED_METHODS[method]["grad_clip"]  # the copy left the method's alone
    with pytest.raises(ValueError, match="grad_clip"):
        stage2_method(method, grad_clip=0.0)
    entry = STAGE2_METHODS[method]
    assert all(isinstance(getattr(entry, k), str) and getattr(entry, k) for k in ("title", "description"))
    assert first["schedule"].uses_unlabeled == (method != "labeled_only")

    parts = stage2_method(method)
    labeled_only = not parts["schedule"].uses_unlabeled
    trainer = make_trainer(iterations=1, method=None, **parts)  # with unlabeled data, which labeled_only never reads
    json.dumps(trainer.run_settings)  # JSON-compatible, for configs and result files
    steps = count_steps(trainer)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    out = trainer.state.output
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    assert (getattr(trainer.weighting, "lookahead", None) is not None) == (method == "mlbseg")
    if labeled_only:
        assert trainer.supervised_only and steps["n"] == 1, "one clean step per iteration"
        assert trainer.data_loader is trainer.clean_data_loader
        assert out["loss"] == out["loss_clean"]
    else:
        assert math.isnan(out["loss_meta"]) == (method != "mlbseg")
        assert (out["loss_weighted"] == 0.0) == (
            method == "mean_teacher" or not trainer.state.weight_maps["weights"].any()
        )
        joint = isinstance(trainer.schedule, JointStep)
        assert steps["n"] == (1 if joint else 2), "the weak-to-strong methods make one joint step"
    with pytest.raises(ValueError, match="unknown stage-2 method 'ssl'") as error:
        stage2_method("ssl")
    assert all(name in str(error.value) for name in STAGE2_METHODS), "the message lists the known names"
    with pytest.raises(ValueError, match="reweight"):
        stage2_method(method, reweight=False)


def test_copy_paste_term_is_one_plain_bce_step_on_the_mixed_views(monkeypatch):
    """CopyPasteTerm: BCE on unlabeled views with a box of a clean view pasted in, against the mixed label."""
    import monai_mlbseg.experimental as experimental

    def left_half(num, spatial_shape, fraction, generator=None, device="cpu"):
        box = torch.zeros(num, 1, *spatial_shape, device=device)
        box[..., : spatial_shape[-1] // 2] = 1.0
        return box

    monkeypatch.setattr(experimental.parts, "random_box_masks", left_half)
    unlabeled = corrupt(disc_samples(2, 16, seed=1))
    clean = disc_samples(2, 16, seed=2)
    trainer = make_trainer(
        iterations=1,
        unlabeled=unlabeled,
        clean=clean,
        method=None,
        terms=[CopyPasteTerm(2.0)],
        schedule=WeightedStepOnly(),
        grad_clip=None,
    )
    net = copy.deepcopy(trainer.network)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer.run()

    views = PLEViews(2).set_random_state(0)
    v = views(unlabeled[0]["image"][None])
    params = views.params
    with torch.no_grad():
        # without a teacher: the student's PLE pseudo labels (its view predictions mapped back, averaged, warped in)
        pseudo = warp_to_views(ple_mean_one(torch.sigmoid(net(v)), params), params, threshold=0.5)
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
    trainer = make_trainer(iterations=2, terms=stage2_method("mlbseg")["terms"] + [CopyPasteTerm(1.0)])
    trainer.run()
    out = trainer.state.output
    assert out["loss_mix"] > 0 and math.isfinite(out["loss_meta"])
    assert out["loss"] == pytest.approx(
        out["loss_weighted"] + out["loss_pc"] + out["loss_mt"] + out["loss_mix"], rel=1e-5
    )
    plain = make_trainer(iterations=1)
    plain.run()
    assert "loss_mix" not in plain.state.output, "off by default (the reference)"
    with pytest.raises(ValueError, match="fraction"):
        CopyPasteTerm(1.0, 1.5)
    only_mix = make_trainer(iterations=1, sources=[], weighting=UniformWeighting(), terms=[CopyPasteTerm(1.0)])
    only_mix.run()
    assert only_mix.state.output["loss"] == pytest.approx(only_mix.state.output["loss_mix"], rel=1e-6)


def test_copy_paste_term_refuses_a_negative_weight():
    with pytest.raises(ValueError, match="weight"):
        CopyPasteTerm(-1.0)


def test_weak_to_strong_is_one_confident_pseudo_label_step_on_the_augmented_views():
    """student_augment + a confident L_mt: the student sees augment(views), the teacher the views themselves."""
    unlabeled = corrupt(disc_samples(2, 16, seed=1))

    def augment(x):
        return 0.6 * x + 0.3

    trainer = make_trainer(
        iterations=1,
        unlabeled=unlabeled,
        method=None,
        terms=[MeanTeacherTerm(1.5, loss=ConfidentPseudoLabelLoss(0.55))],
        mean_teacher=MeanTeacher(noise=0.0),
        schedule=WeightedStepOnly(),
        grad_clip=None,
        student_augment=augment,
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
    """EnsembleMeanTeacherTerm: L_mt's target is the teacher's view predictions mapped back, averaged, warped back."""
    unlabeled = corrupt(disc_samples(2, 16, seed=1))
    trainer = make_trainer(
        iterations=1,
        unlabeled=unlabeled,
        method=None,
        terms=[EnsembleMeanTeacherTerm(1.0, loss=ConfidentPseudoLabelLoss(0.55))],
        mean_teacher=MeanTeacher(noise=0.0),
        schedule=WeightedStepOnly(),
        grad_clip=None,
    )
    assert trainer.run_settings["terms"][0]["_target_"] == "monai_mlbseg.experimental.parts.EnsembleMeanTeacherTerm"
    net, teacher = copy.deepcopy(trainer.network), copy.deepcopy(trainer.teacher)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer.run()

    views = PLEViews(2).set_random_state(0)
    v = views(unlabeled[0]["image"][None])
    params = views.params
    with torch.no_grad():
        t_views = torch.sigmoid(teacher(v))
    # independent PLE mean: undo each view's flip, then its zoom (a centred crop-and-resize), one view at a time
    t = warp_to_views(ple_mean_one(t_views, params), params)
    sure = (torch.maximum(t, 1 - t) >= 0.55).float()
    assert 0 < sure.mean() < 1, "the test needs confident and unsure pixels"
    assert not torch.allclose(t, t_views, atol=1e-3), "the ensemble differs from the views' own predictions"
    bce = F.binary_cross_entropy_with_logits(net(v), (t > 0.5).float(), reduction="none")
    loss = (bce * sure).sum() / bce.numel()
    assert trainer.state.output["loss_mt"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert_one_sgd_step(trainer, net, opt, loss)
    off = make_trainer(iterations=1)
    assert "EnsembleMeanTeacherTerm" not in json.dumps(off.run_settings), "off by default (the reference)"
    assert [type(t) for t in off.terms] == [ViewConsistencyTerm, MeanTeacherTerm]


def _clip(grads, max_norm):
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    return [g * min(1.0, max_norm / (float(norm) + 1e-6)) for g in grads]


@pytest.mark.parametrize("per_term", [True, False])
def test_clip_per_term_clips_the_clean_and_the_unlabeled_gradient_apart(per_term):
    """PerTermClippedJointStep: a joint step adds the clean gradient and the unlabeled one, each clipped on its own."""
    unlabeled = corrupt(disc_samples(2, 16, seed=1))
    clean = disc_samples(2, 16, seed=2)
    trainer = make_trainer(
        iterations=1,
        unlabeled=unlabeled,
        clean=clean,
        method=None,
        sources=[InitialLabels()],
        schedule=PerTermClippedJointStep() if per_term else JointStep(),
        grad_clip=0.05,
    )
    target = trainer.run_settings["schedule"]["_target_"]
    assert target == (
        "monai_mlbseg.experimental.parts.PerTermClippedJointStep" if per_term else JointStep.__module__ + ".JointStep"
    )
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
    # per-term clipping without a joint step is unrepresentable: the per-term clip is itself a joint-step schedule
    schedule = PerTermClippedJointStep()
    assert isinstance(schedule, JointStep) and schedule.steps_per_iteration == 1


def test_weak_to_strong_keeps_the_squared_term_on_the_clean_views_and_refuses_a_bad_confidence():
    terms = [ViewConsistencyTerm(1.0), MeanTeacherTerm(1.0, loss=ConfidentPseudoLabelLoss(0.9))]
    trainer = make_trainer(iterations=1, terms=terms, student_augment=lambda x: x + 0.1)
    assert type(trainer.terms[1].clean_loss).__name__ == "MeanTeacherLoss"
    assert type(trainer.terms[1].loss).__name__ == "ConfidentPseudoLabelLoss"
    trainer.run()
    assert math.isfinite(trainer.state.output["loss_meta"]), "the look-ahead runs on the student's views"
    with pytest.raises(ValueError, match="threshold must lie in"):
        MeanTeacherTerm(1.0, loss=ConfidentPseudoLabelLoss(0.2))


def test_clean_augment_is_what_the_student_sees_of_the_clean_views():
    """clean_augment: labeled-only training is one BCE step on augment(views); the clean step's forward likewise."""
    clean = disc_samples(2, 16, seed=2)

    def augment(x):
        return 0.5 * x + 0.2

    options = dict(terms=[], mean_teacher=None, grad_clip=None, clean_augment=augment)
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
    trainer = make_trainer(iterations=1, clean=clean, weighting=UniformWeighting(), sources=[], clean_augment=augment)
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
            weighting=UniformWeighting(),
            sources=[],
            student_augment=StrongIntensityAugment(),
            clean_augment=StrongIntensityAugment(),
        )
        trainer.run()
        return trainer.student_augment.scale.copy(), trainer.clean_augment.scale.copy(), trainer.state.output["loss"]

    first, second = run(), run()
    assert first[2] == second[2]
    assert (first[0] == second[0]).all() and (first[1] == second[1]).all()
    assert not (first[0][:1] == first[1][:1]).all(), "the two augments draw from differently seeded generators"
