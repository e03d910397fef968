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

    Two ways to the same numbers, bit for bit: on the CPU the touched rows are gathered by index and only
    they are computed (a batch touches B of N rows); on a GPU, where listing the indices would make the
    host wait for the device every step, every row is computed and a mask keeps the untouched ones as they
    were. `masked` picks one (None: by the parameters' device).

    Under fp16 loss scaling, `GradScaler.step` hands it the overflow check as a tensor (`found_inf`, and
    `grad_scale` where the gradients are still scaled) instead of reading it on the host to decide whether
    to step: an overflowed step then touches no row, and a GPU step still never waits.
    """

    _step_supports_amp_scaling = True  # (GradScaler then sets self.found_inf and self.grad_scale for a step)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, masked: bool | None = None):
        if not (lr >= 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1 and eps >= 0 and weight_decay >= 0):
            raise UserError(f"invalid LazyAdamW settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.masked = masked

    def load_state_dict(self, state_dict: dict) -> None:
        """As `torch.optim.Optimizer`'s, which moves a loaded state to its parameter's device except entries
        named "step" (a scalar kept on the CPU by its own optimizers): ours count per row, on the rows' device,
        so a checkpoint read onto the CPU resumes on a GPU."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                assert p.dim() >= 1 and not p.grad.is_sparse, "LazyAdamW updates dense tensors row by row"
                if grad_scale is not None:  # gradients GradScaler has not unscaled
                    p.grad.div_(grad_scale.to(p.device))
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)  # per row
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                touched = p.grad.ne(0).flatten(1).any(dim=1) if p.dim() > 1 else p.grad.ne(0)
                if found_inf is not None:  # an overflowed fp16 step moves nothing
                    touched = touched & found_inf.to(p.device).eq(0)
                masked = p.device.type != "cpu" if self.masked is None else self.masked
                (_update_masked if masked else _update_rows)(p, state, touched, group)
        return loss


def _adamw(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor,
           group: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdamW's update of rows `p` with gradient `g`, moments `m`, `v` and per-row step counts `step` (already
    advanced): the new (p, m, v), computed out of place."""
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    m = m.lerp(g, 1 - beta1)
    v = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
    shape = (-1,) + (1,) * (p.dim() - 1)
    bias1 = (1 - beta1 ** step).to(p.dtype).view(shape)
    bias2 = (1 - beta2 ** step).to(p.dtype).view(shape)
    update = (m / bias1) / ((v / bias2).sqrt() + group["eps"])
    return p * (1 - lr * group["weight_decay"]) - lr * update, m, v


def _update_rows(p: torch.Tensor, state: dict, touched: torch.Tensor, group: dict) -> None:
    """The touched rows, gathered by index."""
    rows = touched.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    state["step"][rows] += 1
    p[rows], state["exp_avg"][rows], state["exp_avg_sq"][rows] = _adamw(
        p[rows], p.grad[rows], state["exp_avg"][rows], state["exp_avg_sq"][rows], state["step"][rows], group)


def _update_masked(p: torch.Tensor, state: dict, touched: torch.Tensor, group: dict) -> None:
    """Every row computed, the untouched ones kept (their never-advanced rows divide 0 by 0: not used)."""
    state["step"].add_(touched)
    new = _adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group)
    keep = touched.view((-1,) + (1,) * (p.dim() - 1))
    for tensor, value in zip((p, state["exp_avg"], state["exp_avg_sq"]), new):
        tensor.copy_(torch.where(keep, value, tensor))
