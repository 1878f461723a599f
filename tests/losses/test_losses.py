import pytest
import torch
import torch.nn.functional as F

from monai_mlbseg.losses import MeanTeacherLoss, MetaReweightLoss, ViewConsistencyLoss, pixel_bce
from monai_mlbseg.transforms import PLEViews, view_pairs, warp_from_views, warp_to_views


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 6, 6, generator=g, requires_grad=True)
    sources = [(torch.rand(4, 1, 6, 6, generator=g) > 0.5).float() for _ in range(2)]
    weights = torch.rand(4, 2, 6, 6, generator=g)
    return logits, sources, weights


def test_pixel_bce_matches_torch(batch):
    logits, sources, _ = batch
    out = pixel_bce(logits, sources)
    assert out.shape == (4, 2, 6, 6)
    for i, s in enumerate(sources):
        assert torch.allclose(out[:, i : i + 1], F.binary_cross_entropy_with_logits(logits, s, reduction="none"))


def test_unweighted_is_the_mean_over_pixels_and_sources(batch):
    logits, sources, _ = batch
    expected = sum(F.binary_cross_entropy_with_logits(logits, s) for s in sources) / 2
    assert torch.allclose(MetaReweightLoss()(logits, sources), expected)
    assert torch.allclose(MetaReweightLoss(reduction="sum")(logits, sources), expected * 2 * logits.numel())
    assert MetaReweightLoss(reduction="none")(logits, sources).shape == (4, 2, 6, 6)
    single = MetaReweightLoss()(logits, sources[0])
    assert torch.allclose(single, F.binary_cross_entropy_with_logits(logits, sources[0]))


def test_weighted_reductions(batch):
    logits, sources, weights = batch
    per_pixel = torch.cat([F.binary_cross_entropy_with_logits(logits, s, reduction="none") for s in sources], dim=1)
    weighted = (weights * per_pixel).sum()
    assert torch.allclose(MetaReweightLoss(reduction="sum")(logits, sources, weights), weighted)
    assert torch.allclose(MetaReweightLoss()(logits, sources, weights), weighted / weights.sum())
    normalised = weights / weights.sum()
    assert torch.allclose(MetaReweightLoss()(logits, sources, normalised), (normalised * per_pixel).sum())
    assert torch.allclose(MetaReweightLoss(reduction="none")(logits, sources, weights), weights * per_pixel)


def test_all_zero_weights_give_zero_loss_and_zero_gradient(batch):
    logits, sources, weights = batch
    loss = MetaReweightLoss()(logits, sources, torch.zeros_like(weights))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.all(logits.grad == 0)


def test_weights_receive_no_gradient(batch):
    logits, sources, weights = batch
    weights.requires_grad_(True)
    MetaReweightLoss()(logits, sources, weights).backward()
    assert weights.grad is None


def test_shape_errors_are_clear(batch):
    logits, sources, weights = batch
    with pytest.raises(ValueError, match="label source 1 has shape"):
        MetaReweightLoss()(logits, [sources[0], sources[1][:, :, :3]])
    with pytest.raises(ValueError, match="weights must have shape"):
        MetaReweightLoss()(logits, sources, weights[:, :1])
    with pytest.raises(ValueError, match=r"logits \[N, 1"):
        MetaReweightLoss()(logits.repeat(1, 2, 1, 1), [s.repeat(1, 2, 1, 1) for s in sources])
    with pytest.raises(ValueError, match="at least one"):
        MetaReweightLoss()(logits, [])
    with pytest.raises(ValueError):
        MetaReweightLoss(reduction="median")


def explicit_pc(probs, params):
    """L_pc written pair by pair, straight from the definition."""
    back = warp_from_views(probs.detach(), params)
    k_views = params.num_views
    total, count = 0.0, 0
    for b in range(params.batch_size):
        for k in range(k_views):
            for j in range(k + 1, k_views):
                one = params.select([k])
                one = type(one)(one.scales[b : b + 1], one.flips[b : b + 1])
                partner = warp_to_views(back[b * k_views + j][None], one)[0]
                total = total + ((probs[b * k_views + k] - partner) ** 2).mean()
                count += 1
    return total / count


def test_view_consistency_matches_the_definition():
    views = PLEViews(2).set_random_state(0)
    logits = torch.randn(10, 1, 12, 12, requires_grad=True)
    views.randomize(2)
    probs = torch.sigmoid(logits)
    ours = ViewConsistencyLoss()(probs, views.params)
    ref = explicit_pc(probs, views.params)
    assert torch.allclose(ours, ref, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-7)
    assert torch.allclose(ViewConsistencyLoss(sigmoid=True)(logits, views.params), ours)
    per_pair = ViewConsistencyLoss(reduction="none")(probs, views.params)
    assert per_pair.shape == (2, len(view_pairs(5)[0]))
    assert torch.allclose(per_pair.mean(), ours)


def test_view_consistency_near_zero_for_equivariant_maps_and_positive_otherwise():
    views = PLEViews(2).set_random_state(1)
    grid = torch.linspace(-1, 1, 40)
    blob = torch.exp(-(grid[:, None] ** 2 + grid[None] ** 2) / 0.1)[None, None]
    equivariant = views(blob.repeat(2, 1, 1, 1))
    assert ViewConsistencyLoss()(equivariant, views.params) < 1e-4
    constant_guess = torch.full_like(equivariant, 0.5)
    assert ViewConsistencyLoss()(constant_guess, views.params) > 1e-2


def test_mean_teacher_loss():
    student = torch.rand(3, 1, 5, 5, requires_grad=True)
    teacher = torch.rand(3, 1, 5, 5, requires_grad=True)
    loss = MeanTeacherLoss()(student, teacher)
    assert torch.allclose(loss, ((student - teacher) ** 2).mean())
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    assert torch.allclose(
        MeanTeacherLoss(sigmoid=True)(student, teacher), ((student.sigmoid() - teacher.sigmoid()) ** 2).mean()
    )
    assert MeanTeacherLoss(reduction="none")(student, teacher).shape == student.shape
    with pytest.raises(ValueError, match="shapes differ"):
        MeanTeacherLoss()(student, teacher[:2])


def test_confident_pseudo_label_loss_matches_the_definition():
    from monai_mlbseg.losses import ConfidentPseudoLabelLoss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 1, 5, 5, generator=g, requires_grad=True)
    teacher = torch.rand(3, 1, 5, 5, generator=g).requires_grad_()
    probs = torch.sigmoid(logits)
    expected = torch.zeros(())
    for s, t in zip(probs.flatten(), teacher.detach().flatten()):
        if max(float(t), 1 - float(t)) >= 0.8:
            y = 1.0 if t > 0.5 else 0.0
            expected = expected - (y * torch.log(s) + (1 - y) * torch.log(1 - s))
    loss = ConfidentPseudoLabelLoss(threshold=0.8)(probs, teacher)
    assert loss.item() == pytest.approx(float(expected.detach()) / probs.numel(), rel=1e-5)
    from_logits = ConfidentPseudoLabelLoss(threshold=0.8, sigmoid=True)(logits, teacher)
    assert from_logits.item() == pytest.approx(loss.item(), rel=1e-5)
    none = ConfidentPseudoLabelLoss(threshold=0.8, reduction="none")(probs, teacher)
    unsure = torch.maximum(teacher, 1 - teacher) < 0.8
    assert none.shape == probs.shape and unsure.any() and torch.all(none[unsure] == 0) and torch.all(none[~unsure] > 0)
    loss.backward()
    assert teacher.grad is None and logits.grad.abs().sum() > 0
    # a teacher sure of nothing gives a zero term; a threshold of 0.5 keeps every pixel
    assert ConfidentPseudoLabelLoss(0.95)(probs, torch.full_like(teacher, 0.6)).item() == 0.0
    everything = F.binary_cross_entropy(probs, (teacher > 0.5).float())
    assert ConfidentPseudoLabelLoss(0.5)(probs, teacher).item() == pytest.approx(everything.item(), rel=1e-5)


def test_confident_pseudo_label_loss_errors():
    from monai_mlbseg.losses import ConfidentPseudoLabelLoss

    with pytest.raises(ValueError, match=r"threshold must lie in \[0.5, 1\], got 0.3"):
        ConfidentPseudoLabelLoss(0.3)
    with pytest.raises(ValueError, match="shapes differ"):
        ConfidentPseudoLabelLoss()(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 5))
