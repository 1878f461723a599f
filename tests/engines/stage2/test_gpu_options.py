"""The GPU-oriented options, checked for correctness on CPU: each must compute what the default path computes."""

import copy

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.utils import set_determinism

from monai_mlbseg.engines import MetaTrainer, stage2_method
from monai_mlbseg.engines.stage2 import STAGE2_TERMS
from monai_mlbseg.meta import MetaLookAhead
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.utils import unwrap_network
from tests.bundle_utils import BUNDLES, TINY
from tests.helpers import corrupt, disc_samples

ITERATIONS = 3


def stage2(network, loader_kwargs=None, epochs=1, **trainer_kwargs):
    """``ITERATIONS`` x ``epochs`` stage-2 iterations of MLB-Seg on fixed data; returns the loss terms, weight maps,
    weights."""
    set_determinism(seed=3)
    loader_kwargs = {"shuffle": True, **(loader_kwargs or {})}
    # one generator per loader: worker processes prefetch, so a shared one would be drawn in another order
    unlabeled = DataLoader(
        corrupt(disc_samples(ITERATIONS, 16, seed=1)),
        batch_size=1,
        generator=torch.Generator().manual_seed(0),
        **loader_kwargs,
    )
    clean = DataLoader(
        disc_samples(4, 16, seed=2), batch_size=2, generator=torch.Generator().manual_seed(1), **loader_kwargs
    )
    opt = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer = MetaTrainer(
        "cpu", epochs, unlabeled, clean, network, opt, **stage2_method("mlbseg"), **trainer_kwargs
    ).set_random_state(0)
    terms, weights = [], []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: (
            terms.append([e.state.output[k] for k in STAGE2_TERMS]),
            weights.append(e.state.weight_maps["weights"].clone()),
        ),
    )
    trainer.run()
    set_determinism(seed=None)
    params = {k: v.detach().clone() for k, v in unwrap_network(network).state_dict().items()}
    return torch.tensor(terms), torch.stack(weights), params, trainer


def assert_same_run(a, b, rtol, atol):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol, equal_nan=True, msg="loss terms differ")
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol, msg="weight maps differ")
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=rtol, atol=atol, msg=f"{name} differs")


def tiny_net():
    torch.manual_seed(0)
    return NestedUNet(2, features=(4, 8, 16))


def test_channels_last_network_trains_exactly_like_the_contiguous_one():
    net = tiny_net()
    last = copy.deepcopy(net).to(memory_format=torch.channels_last)
    conv = last.nodes.conv0_0.conv_1.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    reference, channels_last = stage2(net), stage2(last)
    assert_same_run(reference, channels_last, rtol=1e-4, atol=1e-6)
    assert last.nodes.conv0_0.conv_1.conv.weight.is_contiguous(memory_format=torch.channels_last), "layout kept"
    assert (reference[0][:, STAGE2_TERMS.index("loss")] > 0).all()


def test_compiled_network_trains_like_the_eager_one_and_the_lookahead_uses_the_plain_module():
    net = tiny_net()
    compiled_net = copy.deepcopy(net)
    eager = stage2(net)
    compiled = stage2(compiled_net, compile=True, compile_kwargs={"backend": "aot_eager"})
    trainer = compiled[3]
    assert trainer.network is not compiled_net and unwrap_network(trainer.network) is compiled_net
    teacher_forward = trainer.mean_teacher._forward
    assert unwrap_network(teacher_forward) is trainer.teacher
    assert teacher_forward is not trainer.teacher, "the teacher's forward is compiled too"
    assert trainer.weighting.lookahead.meta_names == [n for n, _ in compiled_net.named_parameters()], (
        "plain parameter names"
    )
    assert_same_run(eager, compiled, rtol=1e-4, atol=1e-6)


def test_lookahead_accepts_an_already_compiled_network():
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    lookahead = MetaLookAhead(torch.compile(net, backend="eager"), opt)
    assert lookahead.meta_names == [n for n, _ in net.named_parameters()]


def test_bf16_autocast_follows_the_float32_run():
    net = tiny_net()
    fp32 = stage2(net)
    bf16 = stage2(tiny_net(), amp=True, amp_kwargs={"dtype": torch.bfloat16})
    loss = STAGE2_TERMS.index("loss")
    torch.testing.assert_close(bf16[0][:, loss], fp32[0][:, loss], rtol=0.05, atol=0.0)
    for name, value in fp32[2].items():
        if value.is_floating_point() and "running" not in name:
            assert torch.allclose(bf16[2][name], value, rtol=0.05, atol=2e-3), name


def test_persistent_workers_and_pinned_memory_give_the_same_training_as_in_process_loading():
    # unshuffled: a persistent iterator draws its base seed once, a new one every epoch, so shuffled orders differ
    # after the first epoch (both valid); the clean loader is cycled across its epoch boundary inside the trainer
    in_process = stage2(tiny_net(), {"shuffle": False}, epochs=2)
    workers = stage2(
        tiny_net(),
        {"shuffle": False, "num_workers": 2, "persistent_workers": True, "pin_memory": torch.cuda.is_available()},
        epochs=2,
    )
    assert len(in_process[0]) == len(workers[0]) == 2 * ITERATIONS
    assert_same_run(in_process, workers, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_bundle_gpu_switches_reach_the_network_loaders_and_trainers(name):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES[name] / "configs" / "train.json"))
    parser.update(
        {**TINY, "num_workers": 2, "channels_last": True, "amp": True, "compile": True, "compile_kwargs": {"x": 1}}
    )
    network = parser.get_parsed_content("network")
    assert network.nodes.conv0_0.conv_1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for key in ("stage1#dataloader#persistent_workers", "train#dataloader#persistent_workers"):
        assert parser.get_parsed_content(key) is True, key
    assert parser.get_parsed_content("train#unlabeled#dataloader#pin_memory") is torch.cuda.is_available()
    for key in ("stage1#trainer", "train#trainer"):
        config = parser.get(key)
        assert (config["amp"], config["compile"], config["compile_kwargs"]) == ("@amp", "@compile", "@compile_kwargs")
    defaults = ConfigParser()
    defaults.read_config(str(BUNDLES[name] / "configs" / "train.json"))
    assert [defaults.get(k) for k in ("amp", "channels_last", "compile")] == [False, False, False], "all off by default"
