"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"), the optimiser of BYOL, SwAV and DINO's
ResNet recipes (solo-learn's ``lars``: SGD with momentum whose step per weight tensor is scaled by a trust ratio).

torch has no LARS; the methods' published CIFAR recipes (solo-learn: BYOL LARS 1.0, SwAV 0.6, DINO 0.3) are tuned
with it, and plain SGD at those learning rates diverges, so a faithful recipe needs it.
"""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio.

    For each tensor ``w`` with gradient ``g`` in a group with ``lars_adapt`` (the default):
    ``ratio = eta * |w| / (|g| + weight_decay * |w|)`` (1 where either norm is 0); with ``clip`` (solo-learn's
    ``clip_lr``, as its BYOL/SwAV/DINO configs set it) ``ratio = min(ratio / lr, 1)``, so a layer's effective learning
    rate is ``min(eta * |w| / ..., lr)``: the trust ratio only ever slows a layer down. Then
    ``d = ratio * (g + weight_decay * w)``, ``buf = momentum * buf + d``, ``w -= lr * buf``.
    Groups with ``lars_adapt=False`` (biases and normalisation parameters, as in BYOL and SimCLR) take the plain SGD
    step ``d = g + weight_decay * w``.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02,
                 clip: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip,
                                      lars_adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, lr = group["weight_decay"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad
                if group["lars_adapt"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    ratio = group["eta"] * w_norm / (g_norm + wd * w_norm)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    if group["clip"] and lr > 0:
                        ratio = (ratio / lr).clamp(max=1.0)
                    d = d * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()  # d may be p.grad itself
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-lr)
        return loss
