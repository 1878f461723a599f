import pytest
import torch

from monai_mlbseg.networks import NestedUNet


def count(net):
    return sum(p.numel() for p in net.parameters())


def test_reference_configuration_parameter_count():
    # UNet++ of the reference, features 64..1024, conv(bias)-BN-ReLU x2 per node, 1 in / 1 out channel
    assert count(NestedUNet(spatial_dims=2, in_channels=1, out_channels=1)) == 36_628_481


def test_node_layout_matches_the_reference_names():
    net = NestedUNet(2, features=(4, 8, 16, 32, 64))
    names = {".".join(n.split(".")[:2]) for n, _ in net.named_parameters()}
    expected = {f"nodes.conv{i}_{j}" for j in range(5) for i in range(5 - j)} | {"final.weight", "final.bias"}
    assert names == expected
    assert net.nodes["conv0_4"][0].conv.in_channels == 4 * 4 + 8
    assert net.nodes["conv3_1"][0].conv.in_channels == 32 + 64


@pytest.mark.parametrize(
    "dims,shape,features",
    [(2, (3, 1, 32, 32), (4, 8, 16, 32, 64)), (2, (2, 2, 36, 44), (4, 8, 16)), (3, (2, 1, 16, 12, 10), (2, 4, 8))],
)
def test_output_shapes_any_size(dims, shape, features):
    net = NestedUNet(dims, in_channels=shape[1], out_channels=3, features=features)
    out = net(torch.rand(*shape))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (shape[0], 3, *shape[2:])
    net.eval()
    with torch.no_grad():
        assert net(torch.rand(*shape)).shape == out.shape


def test_every_parameter_receives_gradient():
    net = NestedUNet(2, features=(2, 4, 8))
    net(torch.rand(2, 1, 16, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_learns_a_trivial_mapping():
    torch.manual_seed(0)
    net = NestedUNet(2, features=(4, 8))
    x = torch.rand(8, 1, 16, 16)
    y = (x > 0.5).float()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    first = loss_fn(net(x), y).item()
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("dims,shape", [(2, (2, 1, 36, 28)), (3, (1, 1, 12, 10, 8))])
def test_torchscript_and_torch_export_reproduce_eager(dims, shape):
    net = NestedUNet(dims, features=(4, 8, 16)).eval()
    x = torch.rand(*shape)
    with torch.no_grad():
        eager = net(x)
        assert torch.allclose(torch.jit.script(net)(x), eager, atol=1e-6)
        assert torch.allclose(torch.export.export(net, (x,)).module()(x), eager, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        NestedUNet(1)
    with pytest.raises(ValueError, match="two levels"):
        NestedUNet(2, features=(8,))


def test_dropout_samples_in_train_mode_only():
    """MONAI Label's epistemic scoring sets ``network_def#dropout`` and runs the network in train mode: the dropout
    the network is built with must then draw, and never in eval mode; the default network has none."""
    torch.manual_seed(0)
    net = NestedUNet(2, features=(4, 8), dropout=0.2)
    x = torch.rand(2, 1, 32, 32)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
    default = NestedUNet(2, features=(4, 8))
    assert not [m for m in default.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
