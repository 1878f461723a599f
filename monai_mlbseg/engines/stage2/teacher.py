"""The mean teacher, an acting part of stage 2: the EMA network and its forward."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import record_function

from monai_mlbseg.utils import unwrap_network

from ..teacher import MeanTeacherHandler
from .host import Stage2Host

__all__ = ["MeanTeacher"]


class MeanTeacher:
    """
    The mean teacher: an exponential moving average of the student (updated by a
    :py:class:`~monai_mlbseg.engines.MeanTeacherHandler` after every optimizer step) and its forward, which adds
    Gaussian noise to its input and runs through the engine's inferer, autocast and ``torch.compile`` settings.

    Args:
        network: the teacher network (same architecture as the student); default: a deep copy of the student made
            when the trainer is built. Its parameters never require gradients.
        decay: EMA decay (0.99 in the reference).
        noise: std of the Gaussian noise added to the teacher's input (0.02 in the reference).

    Example::

        trainer = MetaTrainer(..., mean_teacher=MeanTeacher(teacher_net, decay=0.99))
    """

    def __init__(self, network: nn.Module | None = None, decay: float = 0.99, noise: float = 0.02) -> None:
        self.module = network
        self.decay = float(decay)
        self.noise = float(noise)
        self._host: Stage2Host | None = None
        self._forward: Callable[..., torch.Tensor] | None = None

    def attach(self, host: Stage2Host) -> None:
        """Take the student's copy if no network was given, register the EMA updates, compile if asked."""
        if self.module is None:
            self.module = copy.deepcopy(unwrap_network(host.network))
        MeanTeacherHandler(self.module, decay=self.decay).attach(host)  # type: ignore[arg-type]
        self._host = host
        self._forward = torch.compile(self.module, **host.compile_kwargs) if host.compile else self.module

    def probs(self, views: torch.Tensor) -> torch.Tensor:
        """The teacher's probabilities (float32, no gradient) on ``views`` with input noise (``mlbseg.teacher``).

        Raises:
            RuntimeError: before the teacher is attached to a trainer.
        """
        if self._host is None or self._forward is None:
            raise RuntimeError("the mean teacher is not attached to a trainer yet.")
        with record_function("mlbseg.teacher"), torch.no_grad():
            noisy = views + self.noise * torch.randn_like(views)
            return torch.sigmoid(self._host.run_network(self._forward, noisy))
