"""Network helpers shared by the engines, the look-ahead and the bundle configs."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_network"]


def unwrap_network(network: nn.Module) -> nn.Module:
    """
    The module inside ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile`` wrappers, in any nesting
    (the network itself otherwise). Its parameter names are the plain model's, as in a saved state dict.

    Args:
        network: a network, possibly wrapped.

    Returns:
        the innermost plain module.

    Example::

        state = unwrap_network(torch.compile(ddp_network)).state_dict()
    """
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            network = network._orig_mod
        else:
            return network
