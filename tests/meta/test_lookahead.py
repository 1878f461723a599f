"""The meta look-ahead against independent computations (per-pixel gradients, finite differences of a real SGD step)."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from monai_mlbseg.losses import pixel_bce
from monai_mlbseg.meta import MetaLookAhead, meta_weight_maps, normalise_weights
from monai_mlbseg.networks import NestedUNet


def make_problem(seed=0, size=4):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = NestedUNet(2, features=(2, 4)).double().train()
    images = torch.rand(2, 1, size, size, generator=g, dtype=torch.float64)
    sources = [(torch.rand(2, 1, size, size, generator=g) > 0.5).double() for _ in range(2)]
    clean = torch.rand(3, 1, size, size, generator=g, dtype=torch.float64)
    clean_y = (torch.rand(3, 1, size, size, generator=g) > 0.5).double()
    return net, images, sources, clean, clean_y


def extra_loss(logits):
    """A regulariser standing in for L_pc + L_mt: any smooth scalar of the logits."""
    p = torch.sigmoid(logits)
    return ((p - p.flip(-1).detach()) ** 2).mean() + 0.3 * (p**2).mean()


def real_step_meta_loss(net, optimizer, eps, images, sources, clean, clean_y, extra=None):
    """L_meta after one genuine torch.optim.SGD step on sum(eps * l) + extra, on copies of everything."""
    net2 = copy.deepcopy(net)
    name_of = {id(p): n for n, p in net.named_parameters()}
    copies = dict(net2.named_parameters())
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [copies[name_of[id(p)]] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    opt2 = type(optimizer)(groups)
    opt2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    logits = net2(images)
    loss = (eps * pixel_bce(logits, sources)).sum()
    if extra is not None:
        loss = loss + extra(logits)
    opt2.zero_grad()
    loss.backward()
    opt2.step()
    with torch.no_grad():
        return F.binary_cross_entropy_with_logits(net2(clean), clean_y)


def finite_difference_neg_grad(net, optimizer, images, sources, clean, clean_y, extra=None, h=1e-6):
    shape = (images.shape[0], len(sources), *images.shape[2:])
    out = torch.zeros(shape, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape]):
        e = torch.zeros(shape, dtype=torch.float64)
        e[tuple(idx)] = h
        plus = real_step_meta_loss(net, optimizer, e, images, sources, clean, clean_y, extra)
        minus = real_step_meta_loss(net, optimizer, -e, images, sources, clean, clean_y, extra)
        out[tuple(idx)] = -(plus - minus) / (2 * h)
    return out


def warm_momentum(net, optimizer, images):
    """One real step so that the optimizer has momentum buffers."""
    optimizer.zero_grad()
    torch.sigmoid(net(images)).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_matches_explicit_per_pixel_gradient_inner_products():
    net, images, sources, clean, clean_y = make_problem()
    lr = 0.1
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    result = MetaLookAhead(net, optimizer)(images, sources, clean, clean_y)
    # independent: -g_kj = lr * <grad L_meta(theta), grad l_kj(theta)>, pixel by pixel
    ref_net = copy.deepcopy(net)
    params = list(ref_net.parameters())
    meta = torch.autograd.grad(F.binary_cross_entropy_with_logits(ref_net(clean), clean_y), params)
    losses = pixel_bce(ref_net(images), sources)
    expected = torch.zeros_like(losses)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in losses.shape]):
        grads = torch.autograd.grad(losses[tuple(idx)], params, retain_graph=True)
        expected[tuple(idx)] = lr * sum((a * b).sum() for a, b in zip(grads, meta))
    assert torch.allclose(result.neg_meta_grad, expected, atol=1e-12, rtol=1e-9)
    assert (expected > 0).any() and (expected < 0).any(), "the test problem must have both signs"
    w = result.weights
    assert w.shape == (2, 2, 4, 4) and torch.all(w >= 0)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert torch.equal(w > 0, expected > 0)
    assert torch.allclose(meta_weight_maps(net, images, sources, clean, clean_y, optimizer), w)


def test_matches_finite_differences_of_a_plain_sgd_step():
    net, images, sources, clean, clean_y = make_problem(1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    ours = MetaLookAhead(net, optimizer)(images, sources, clean, clean_y).neg_meta_grad
    fd = finite_difference_neg_grad(net, optimizer, images, sources, clean, clean_y)
    assert torch.allclose(ours, fd, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize(
    "settings,warm",
    [
        ({"momentum": 0.9, "weight_decay": 5e-4}, True),
        ({"momentum": 0.9, "weight_decay": 5e-4}, False),
        ({"momentum": 0.9, "weight_decay": 1e-2, "dampening": 0.3}, True),
        ({"momentum": 0.8, "weight_decay": 1e-3, "nesterov": True}, True),
    ],
)
def test_matches_finite_differences_with_momentum_weight_decay_and_extra_loss(settings, warm):
    net, images, sources, clean, clean_y = make_problem(2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, **settings)
    if warm:
        warm_momentum(net, optimizer, images)
    ours = MetaLookAhead(net, optimizer)(images, sources, clean, clean_y, extra_loss=extra_loss).neg_meta_grad
    fd = finite_difference_neg_grad(net, optimizer, images, sources, clean, clean_y, extra=extra_loss)
    assert torch.allclose(ours, fd, atol=1e-8, rtol=1e-5)


def test_param_groups_and_parameters_outside_the_optimizer():
    net, images, sources, clean, clean_y = make_problem(3)
    decoder = [p for n, p in net.named_parameters() if n.startswith(("nodes.conv0_1", "final"))]
    encoder = [p for n, p in net.named_parameters() if n.startswith("nodes.conv1_0")]
    # conv0_0 is not optimized at all: a real step leaves it unchanged, so must the look-ahead
    optimizer = torch.optim.SGD([{"params": decoder, "lr": 0.1}, {"params": encoder, "lr": 0.02}], momentum=0.9)
    warm_momentum(net, optimizer, images)
    ours = MetaLookAhead(net, optimizer)(images, sources, clean, clean_y, extra_loss=extra_loss).neg_meta_grad
    fd = finite_difference_neg_grad(net, optimizer, images, sources, clean, clean_y, extra=extra_loss)
    assert torch.allclose(ours, fd, atol=1e-8, rtol=1e-5)


def test_eval_mode_batchnorm_matches_finite_differences():
    net, images, sources, clean, clean_y = make_problem(4)
    with torch.no_grad():
        net(torch.rand(4, 1, 4, 4, dtype=torch.float64))  # non-trivial running statistics
    net.eval()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ours = MetaLookAhead(net, optimizer)(images, sources, clean, clean_y).neg_meta_grad
    fd = finite_difference_neg_grad(net, optimizer, images, sources, clean, clean_y)
    assert torch.allclose(ours, fd, atol=1e-8, rtol=1e-5)


def test_leaves_parameters_buffers_gradients_and_optimizer_state_unchanged():
    net, images, sources, clean, clean_y = make_problem(5)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    warm_momentum(net, optimizer, images)
    before_state = copy.deepcopy(net.state_dict())
    before_opt = copy.deepcopy(optimizer.state_dict())
    MetaLookAhead(net, optimizer)(images, sources, clean, clean_y, extra_loss=extra_loss)
    after_state = net.state_dict()
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state), "parameters/buffers changed"
    assert any("running_mean" in k for k in before_state) and any("num_batches_tracked" in k for k in before_state)
    after_opt = optimizer.state_dict()
    for key, state in before_opt["state"].items():
        assert torch.equal(state["momentum_buffer"], after_opt["state"][key]["momentum_buffer"])
    assert before_opt["param_groups"] == after_opt["param_groups"]
    assert all(p.grad is None for p in net.parameters())
    assert net.training


def test_caller_supplied_gradients_equal_the_extra_loss_path():
    net, images, sources, clean, clean_y = make_problem(6)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    warm_momentum(net, optimizer, images)
    lookahead = MetaLookAhead(net, optimizer)
    via_loss = lookahead(images, sources, clean, clean_y, extra_loss=extra_loss)
    ref = copy.deepcopy(net)
    grads = torch.autograd.grad(extra_loss(ref(images)), list(ref.parameters()))
    named = dict(zip([n for n, _ in ref.named_parameters()], grads))
    via_grads = lookahead(images, sources, clean, clean_y, lookahead_grads=named)
    assert torch.allclose(via_loss.neg_meta_grad, via_grads.neg_meta_grad, atol=1e-12)
    assert torch.allclose(via_loss.meta_loss, via_grads.meta_loss)


def test_meta_parameter_subset_restricts_the_inner_product():
    net, images, sources, clean, clean_y = make_problem(7)
    lr = 0.1
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    result = MetaLookAhead(net, optimizer, meta_params=["nodes.conv0_1", "final"])(images, sources, clean, clean_y)
    ref = copy.deepcopy(net)
    chosen = [p for n, p in ref.named_parameters() if n.startswith(("nodes.conv0_1.", "final."))]
    meta = torch.autograd.grad(F.binary_cross_entropy_with_logits(ref(clean), clean_y), chosen)
    losses = pixel_bce(ref(images), sources)
    expected = torch.zeros_like(losses)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in losses.shape]):
        grads = torch.autograd.grad(losses[tuple(idx)], chosen, retain_graph=True)
        expected[tuple(idx)] = lr * sum((a * b).sum() for a, b in zip(grads, meta))
    assert torch.allclose(result.neg_meta_grad, expected, atol=1e-12, rtol=1e-9)
    assert set(result.meta_grads) == {
        n for n, _ in net.named_parameters() if n.startswith(("nodes.conv0_1.", "final."))
    }


def test_weights_are_zero_not_nan_when_nothing_is_positive():
    net, images, sources, clean, clean_y = make_problem(8)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    w = meta_weight_maps(net, images, sources, clean, clean_y, optimizer)
    assert torch.all(w == 0) and torch.isfinite(w).all()
    assert torch.all(normalise_weights(-torch.rand(3, 2, 4, 4)) == 0)
    w = normalise_weights(torch.tensor([[-1.0, 3.0], [1.0, 0.0]]))
    assert torch.allclose(w, torch.tensor([[0.0, 0.75], [0.25, 0.0]]))


def test_errors():
    net, images, sources, clean, clean_y = make_problem(9)
    with pytest.raises(TypeError, match="SGD"):
        MetaLookAhead(net, torch.optim.Adam(net.parameters()))
    with pytest.raises(ValueError, match="select none"):
        MetaLookAhead(net, torch.optim.SGD(net.parameters(), lr=0.1), meta_params=["decoder"])
    with pytest.raises(ValueError, match="maximize"):
        MetaLookAhead(net, torch.optim.SGD(net.parameters(), lr=0.1, maximize=True))
    with pytest.raises(ValueError, match="none of the network"):
        MetaLookAhead(net, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_distributed_data_parallel_uses_the_inner_module(tmp_path):
    net, images, sources, clean, clean_y = make_problem(10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    plain = MetaLookAhead(net, optimizer)(images, sources, clean, clean_y, extra_loss=extra_loss)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        wrapped = MetaLookAhead(ddp, optimizer)(images, sources, clean, clean_y, extra_loss=extra_loss)
    finally:
        dist.destroy_process_group()
    assert torch.allclose(plain.neg_meta_grad, wrapped.neg_meta_grad, atol=1e-12)
