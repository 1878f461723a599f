"""
The meta look-ahead of MLB-Seg: per-pixel weight maps from one differentiable SGD step.

With ``eps`` weighting the per-pixel losses ``l_kj`` of the training batch, one SGD step gives
``theta_hat(eps)``, and the meta loss on clean data is ``L_meta(theta_hat(eps))``. Because
``d theta_hat / d eps_kj = -lr * c * grad_theta l_kj(theta)`` (``c`` depends only on the SGD momentum/dampening/
nesterov settings, not on the momentum buffer, weight decay or regularisers),

    -dL_meta/d eps_kj = lr * c * <grad L_meta(theta_hat(0)), grad l_kj(theta)> = (J_l(theta) . t)_kj,

with ``t = lr * c * grad L_meta(theta_hat(0))``. So the whole meta-gradient map is one ordinary backward of the
meta loss at ``theta_hat(0)`` and one forward-mode Jacobian-vector product of the per-pixel losses
(:py:func:`torch.func.jvp`); no second-order graph is built. Network parameters, buffers (BatchNorm running
statistics included) and the optimizer state are left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.modules.batchnorm import _NormBase

from monai_mlbseg.losses.reweight import pixel_bce
from monai_mlbseg.utils import profiled, unwrap_network

__all__ = ["LookAheadResult", "MetaLookAhead", "WEIGHTINGS", "meta_weight_maps", "normalise_weights"]


class LookAheadResult(NamedTuple):
    """
    Output of :py:class:`MetaLookAhead`.

    Attributes:
        weights: ``[N, n_sources, *S]`` normalised weight maps: ``relu(-g) / (sum relu(-g) + eps)``.
        neg_meta_grad: ``[N, n_sources, *S]`` the raw ``-dL_meta/d eps`` at ``eps = 0``.
        meta_loss: the meta loss ``L_meta(theta_hat(0))`` (detached scalar).
        meta_grads: ``grad L_meta(theta_hat(0))`` of every looked-ahead parameter, by name.
    """

    weights: torch.Tensor
    neg_meta_grad: torch.Tensor
    meta_loss: torch.Tensor
    meta_grads: dict[str, torch.Tensor]


#: how the raw map ``x = -dL_meta/d eps`` becomes weights (see :py:func:`normalise_weights`).
WEIGHTINGS = ("gradient", "sign", "agreement")


def normalise_weights(neg_meta_grad: torch.Tensor, eps: float = 1e-10, weighting: str = "gradient") -> torch.Tensor:
    """
    ``"gradient"`` (the reference): ``w = relu(x) / (sum relu(x) + eps)``; ``"sign"``: ``w = 1[x > 0] / (#{x > 0} +
    eps)``, every pixel whose loss gradient agrees with the clean data's weighted alike, however large its gradient;
    ``"agreement"``: ``w = relu(x) / (sum |x| + eps)``, the reference's maps scaled by the share of the meta-gradient
    mass that agrees with the clean data, so the weights sum to that share (at most 1) instead of 1: a batch whose
    labels mostly disagree with the clean data trains the student less. Sums are taken jointly over all entries; all
    zeros when nothing is positive.

    Args:
        neg_meta_grad: the raw map ``-dL_meta/d eps``.
        eps: stabiliser of the denominator.
        weighting: one of :py:data:`WEIGHTINGS`.

    Raises:
        ValueError: for an unknown ``weighting``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    if weighting == "sign":
        positive = (neg_meta_grad > 0).to(neg_meta_grad.dtype)
        return positive / (positive.sum() + eps)
    positive = torch.relu(neg_meta_grad)
    total = neg_meta_grad.abs().sum() if weighting == "agreement" else positive.sum()
    return positive / (total + eps)


def _stateless_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Buffers for a functional call that must not mutate state.

    Normalisation layers in training mode use batch statistics; their running statistics do not change the output,
    so they are replaced by ``None`` (as with ``track_running_stats=False``): same result, nothing updated, and
    ``torch.func`` transforms accept it.
    """
    buffers: dict[str, torch.Tensor | None] = dict(module.named_buffers())
    for name, sub in module.named_modules():
        if isinstance(sub, _NormBase) and sub.training and sub.track_running_stats:
            prefix = f"{name}." if name else ""
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                if f"{prefix}{key}" in buffers:
                    buffers[f"{prefix}{key}"] = None
    return buffers


class _SGDTerms(NamedTuple):
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    buffer: torch.Tensor | None

    def step(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``theta - lr * direction`` exactly as ``torch.optim.SGD.step`` would compute it."""
        direction = grad + self.weight_decay * param if self.weight_decay else grad
        if self.momentum:
            if self.buffer is None:
                velocity = direction
            else:
                velocity = self.momentum * self.buffer + (1 - self.dampening) * direction
            direction = direction + self.momentum * velocity if self.nesterov else velocity
        return param - self.lr * direction

    def tangent_scale(self) -> float:
        """``lr * d(direction)/d(grad)``: the factor between ``-d theta_hat / d eps`` and the loss gradient."""
        if not self.momentum:
            return self.lr
        velocity = 1.0 if self.buffer is None else 1.0 - self.dampening
        return self.lr * (1.0 + self.momentum * velocity if self.nesterov else velocity)


def _sgd_terms(optimizer: torch.optim.Optimizer, named: Mapping[str, torch.Tensor]) -> dict[str, _SGDTerms]:
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(
            f"the look-ahead differentiates an SGD step; got {type(optimizer).__name__}. Use torch.optim.SGD."
        )
    by_id = {id(p): name for name, p in named.items()}
    terms: dict[str, _SGDTerms] = {}
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ValueError("the look-ahead does not support SGD(maximize=True).")
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None:
                continue
            state = optimizer.state.get(p, {})
            terms[name] = _SGDTerms(
                lr=float(group["lr"]),
                momentum=float(group.get("momentum", 0.0)),
                dampening=float(group.get("dampening", 0.0)),
                weight_decay=float(group.get("weight_decay", 0.0)),
                nesterov=bool(group.get("nesterov", False)),
                buffer=state.get("momentum_buffer"),
            )
    if not terms:
        raise ValueError("the optimizer holds none of the network's trainable parameters.")
    return terms


class MetaLookAhead:
    """
    Computes MLB-Seg's per-pixel weight maps for a batch (ALGORITHM steps A-C).

    Args:
        network: the student; ``network(x)`` returns logits ``[N, 1, *S]``. DDP/DataParallel wrappers are unwrapped.
        optimizer: the trainer's ``torch.optim.SGD``; the look-ahead uses each parameter's group lr, momentum,
            dampening, nesterov and weight decay and its current momentum buffer (none yet: the plain gradient, as
            ``torch.optim.SGD``). Parameters outside the optimizer are held fixed.
        meta_params: names or name prefixes (module paths) of the parameters whose update is differentiated
            (default: every optimized parameter, the exact method). A subset (e.g. ``("nodes.conv0_4", "final")``)
            approximates the meta-gradient by those parameters only, at a fraction of the cost.
        eps: stabiliser of the weight normalisation.
        weighting: how the meta-gradient becomes weights, see :py:func:`normalise_weights` (default the
            reference's ``"gradient"``).
        pixel_loss: the per-pixel training loss ``pixel_loss(logits, label_sources)`` -> ``[N, n_sources, *S]``
            whose weights are learned (default :py:func:`~monai_mlbseg.losses.pixel_bce`); the real step must use
            the same one (a :py:class:`~monai_mlbseg.engines.MetaTrainer` passes its loss function's).

    Raises:
        TypeError: when the optimizer is not SGD.
        ValueError: when ``meta_params`` selects nothing or the optimizer holds none of the parameters.

    Example::

        lookahead = MetaLookAhead(net, optimizer)
        result = lookahead(views, [initial_labels, pseudo_labels], clean_views, clean_labels,
                           extra_loss=lambda logits: l_pc(torch.sigmoid(logits), params))
        loss = MetaReweightLoss()(net(views), [initial_labels, pseudo_labels], result.weights)
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        meta_params: Sequence[str] | None = None,
        eps: float = 1e-10,
        weighting: str = "gradient",
        pixel_loss: Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor] = pixel_bce,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
        self.weighting = weighting
        self.network = network
        self.optimizer = optimizer
        self.meta_params = None if meta_params is None else tuple(meta_params)
        self.eps = eps
        self.pixel_loss = pixel_loss
        module = unwrap_network(network)
        named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        optimized = set(_sgd_terms(optimizer, named))
        if self.meta_params is None:
            selected = optimized
        else:
            selected = {n for n in optimized if any(n == m or n.startswith(f"{m}.") for m in self.meta_params)}
            if not selected:
                raise ValueError(f"meta_params {list(self.meta_params)} select none of the optimized parameters.")
        self.meta_names = [n for n in named if n in selected]

    @profiled("look_ahead")
    def __call__(
        self,
        images: torch.Tensor,
        label_sources: Sequence[torch.Tensor],
        clean_images: torch.Tensor,
        clean_labels: torch.Tensor,
        extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
        lookahead_grads: Mapping[str, torch.Tensor | None] | None = None,
    ) -> LookAheadResult:
        """
        Args:
            images: ``[N, C, *S]`` the training batch (e.g. all views of the unlabeled images).
            label_sources: the label sources ``[N, 1, *S]`` the per-pixel losses are taken against.
            clean_images: ``[M, C, *S]`` clean images (e.g. their views).
            clean_labels: ``[M, 1, *S]`` their expert labels.
            extra_loss: ``extra_loss(logits)`` -> scalar, added to the look-ahead's training loss (L_pc + L_mt);
                it enters through ``theta_hat(0)`` only.
            lookahead_grads: the gradient of ``extra_loss`` at the current parameters by name, when the caller has
                it already (the trainer's real forward); ``extra_loss`` is then not evaluated again.

        Returns:
            :py:class:`LookAheadResult`.
        """
        module = unwrap_network(self.network)
        named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        terms = _sgd_terms(self.optimizer, named)
        theta = {n: p.detach() for n, p in module.named_parameters()}
        buffers = _stateless_buffers(module)

        grads = self._train_grads(module, named, theta, buffers, images, extra_loss, lookahead_grads)
        theta_hat = dict(theta)
        for name, term in terms.items():
            theta_hat[name] = term.step(theta[name], grads[name])

        leaves = {n: theta_hat[n].requires_grad_(True) for n in self.meta_names}
        with torch.enable_grad():
            clean_logits = functional_call(module, {**theta_hat, **leaves, **buffers}, (clean_images,))
            meta_loss = F.binary_cross_entropy_with_logits(clean_logits, clean_labels.to(clean_logits.dtype))
            meta_grads = torch.autograd.grad(meta_loss, list(leaves.values()), allow_unused=True)
        meta_grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(self.meta_names, meta_grads)}
        tangents = {n: terms[n].tangent_scale() * meta_grads[n] for n in self.meta_names}
        fixed = {n: v for n, v in theta.items() if n not in tangents}

        def pixel_losses(meta_theta: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = functional_call(module, {**fixed, **meta_theta, **buffers}, (images,))
            return self.pixel_loss(logits, label_sources)

        primals = {n: theta[n] for n in self.meta_names}
        _, neg_meta_grad = jvp(pixel_losses, (primals,), (tangents,))
        neg_meta_grad = neg_meta_grad.detach()
        weights = normalise_weights(neg_meta_grad, self.eps, self.weighting)
        return LookAheadResult(weights, neg_meta_grad, meta_loss.detach(), meta_grads)

    @staticmethod
    def _train_grads(
        module: nn.Module,
        named: Mapping[str, torch.Tensor],
        theta: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor | None],
        images: torch.Tensor,
        extra_loss: Callable[[torch.Tensor], torch.Tensor] | None,
        lookahead_grads: Mapping[str, torch.Tensor | None] | None,
    ) -> dict[str, torch.Tensor]:
        """Gradient of the look-ahead training loss at ``eps = 0`` (only the extra loss contributes)."""
        if lookahead_grads is not None:
            return {
                n: torch.zeros_like(theta[n]) if lookahead_grads.get(n) is None else lookahead_grads[n].detach()
                for n in named
            }
        if extra_loss is None:
            return {n: torch.zeros_like(theta[n]) for n in named}
        leaves = {n: theta[n].clone().requires_grad_(True) for n in named}
        with torch.enable_grad():
            logits = functional_call(module, {**theta, **leaves, **buffers}, (images,))
            grads = torch.autograd.grad(extra_loss(logits), list(leaves.values()), allow_unused=True)
        return {n: torch.zeros_like(theta[n]) if g is None else g for n, g in zip(named, grads)}


def meta_weight_maps(
    network: nn.Module,
    images: torch.Tensor,
    label_sources: Sequence[torch.Tensor],
    clean_images: torch.Tensor,
    clean_labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """
    MLB-Seg's per-pixel weight maps: ``relu(-dL_meta/d eps)`` normalised jointly to sum 1 (all zeros when no entry is
    positive). See :py:class:`MetaLookAhead` for the arguments and the method.

    Args:
        network: the student, returns logits ``[N, 1, *S]``.
        images: ``[N, C, *S]`` training batch.
        label_sources: per-pixel label sources, each ``[N, 1, *S]`` (e.g. initial label and pseudo label).
        clean_images: ``[M, C, *S]`` clean images.
        clean_labels: ``[M, 1, *S]`` clean labels.
        optimizer: the trainer's SGD optimizer (its settings and momentum buffers define the look-ahead step).
        extra_loss: optional scalar function of the logits added to the look-ahead training loss.

    Returns:
        ``[N, len(label_sources), *S]`` non-negative weights summing to 1 (or all 0).

    Example::

        w = meta_weight_maps(net, views, [y_init, y_pseudo], clean_views, clean_y, optimizer)
    """
    return MetaLookAhead(network, optimizer)(images, label_sources, clean_images, clean_labels, extra_loss).weights
