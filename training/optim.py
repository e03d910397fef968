"""Optimizers the loop offers beyond torch's own: Adam that updates only the rows a step touched.

Diffusion inversion learns one embedding per training image, a table of N rows of which a batch
touches B. Plain AdamW moves every row at every step: a row's momentum keeps carrying it along its
last gradient for many steps after its image left the batch, and its second moment decays between
visits, so the effective step of a row grows with N / B. `LazyAdamW` (the "lazy Adam" of sparse
embedding training) keeps Adam's moments and bias correction per row and advances a row only on the
steps whose gradient reaches it, so every embedding follows the trajectory AdamW would give it if
its image were inverted alone, whatever N and the batch size.
"""

from __future__ import annotations

import torch

from core.errors import UserError


class LazyAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) applied row by row (dim 0) to the rows with a non-zero gradient.

    With every row touched at every step it is exactly `torch.optim.AdamW`; a row whose gradient is
    zero keeps its value, its moments and its step count. Parameters must be at least 1-D.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not (lr >= 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1 and eps >= 0 and weight_decay >= 0):
            raise UserError(f"invalid LazyAdamW settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                assert p.dim() >= 1 and not p.grad.is_sparse, "LazyAdamW updates dense tensors row by row"
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)  # per row
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad = p.grad.flatten(1) if p.dim() > 1 else p.grad.unsqueeze(1)
                rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                step = state["step"][rows] + 1
                state["step"][rows] = step
                g = p.grad[rows]
                m = state["exp_avg"][rows].lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
                shape = (-1,) + (1,) * (p.dim() - 1)
                bias1 = (1 - beta1 ** step).to(p.dtype).view(shape)
                bias2 = (1 - beta2 ** step).to(p.dtype).view(shape)
                update = (m / bias1) / ((v / bias2).sqrt() + group["eps"])
                lr = group["lr"]
                p[rows] = p[rows] * (1 - lr * group["weight_decay"]) - lr * update
        return loss
