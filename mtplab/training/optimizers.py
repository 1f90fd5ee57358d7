"""Optimizers: AdamW everywhere, or Muon / Aurora for the hidden matrices with AdamW for the rest.

Muon (Keller Jordan's, as in modded-nanogpt): Nesterov momentum, then the update is replaced by an
approximation of its polar factor (U V^T of its SVD) from 5 Newton–Schulz iterations with the
quintic coefficients (3.4445, -4.7750, 2.0315). Those coefficients trade exactness for speed: the
singular values come out in roughly [0.7, 1.2] rather than exactly 1, which is what Muon wants.

Aurora (Tilde Research's public release, AOMTS's matrix optimizer) takes an *exact* polar factor
whose row norms are balanced. The polar factor U of a tall m x n update has orthonormal columns, so
its squared row norms (one per output neuron) sum to n but can be very unequal. Aurora exploits the
freedom of a diagonal left preconditioner D: polar(D G) is still a matrix with orthonormal columns,
and D is chosen so that its squared row norms all come out near the mean n / m. D starts at
1 / (row norm of G); after each polar step it is multiplied by (target / row_sq(U))^0.5; two polar
steps, the last U is the update. A wide matrix goes through its transpose (so its *columns* are
balanced and its rows orthonormal); a square one has no freedom left and takes the plain polar
factor. The polar factor is accurate: 12 Newton–Schulz iterations of the simple quintic
p(s) = 2s - 1.5s^3 + 0.5s^5 (s = 1 super-attracting), in fp32 (the reference's bf16 is a GPU speed
choice).

Both use Nesterov momentum (0.95), scale the update by sqrt(max(1, rows/cols)) and use decoupled
weight decay. Embeddings, the unembedding, norms and scalars are not "hidden matrices" and go to
AdamW with their own learning rate.
"""

from __future__ import annotations

import torch

from ..config import Config

NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Parameters that map tokens to vectors or vectors to tokens: AdamW's, whatever their shape.
VOCAB_MATRICES = ("wte.", "wpe.", "lm_head.", "heads.lm_heads.")


def quintic_iteration(g: torch.Tensor, coeffs: tuple[float, float, float], steps: int,
                      eps: float = 1e-7) -> torch.Tensor:
    """x <- a x + (b x x^T + c (x x^T)^2) x, `steps` times, from g normalised: each singular value
    s follows a s + b s^3 + c s^5 (towards 1 for the polar-factor coefficients below)."""
    a, b, c = coeffs
    x = g.float() / (g.float().norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the basin
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate polar factor of a 2-D matrix (singular values pushed towards 1)."""
    return quintic_iteration(g, NS_COEFFS, steps, eps)


POLAR_COEFFS = (2.0, -1.5, 0.5)  # p(s) = 2s - 1.5s^3 + 0.5s^5: fixed points 0, 1, sqrt(2)
POLAR_STEPS = 12


def polar(g: torch.Tensor, steps: int = POLAR_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Accurate polar factor U V^T of a 2-D matrix, in fp32: Frobenius normalisation puts every
    singular value in (0, 1], then `steps` iterations of the simple quintic drive them to 1 (small
    ones double per step, near 1 the error is cubed)."""
    return quintic_iteration(g, POLAR_COEFFS, steps, eps)


def aurora_polar(g: torch.Tensor, iterations: int = 2, beta: float = 0.5, steps: int = POLAR_STEPS,
                 eps: float = 1e-7, return_scaling: bool = False):
    """Aurora's direction for update g (unscaled): polar(D g) with the diagonal D re-estimated so
    that the rows of a tall result (the columns of a wide one) have equal norms. Square: polar(g).
    With `return_scaling`, also the last D (a column vector over the rows of the tall form)."""
    rows, cols = g.shape
    if rows == cols:
        u = polar(g, steps, eps)
        return (u, torch.ones(rows, 1)) if return_scaling else u
    wide = rows < cols
    x = (g.T if wide else g).float()  # tall: m > n
    target = x.size(1) / x.size(0)  # the mean squared row norm of m x n orthonormal columns
    d = 1.0 / x.norm(dim=1, keepdim=True).clamp(min=eps)
    for k in range(iterations):
        u = polar(d * x, steps, eps)
        if k < iterations - 1:
            row_sq = u.pow(2).sum(dim=1, keepdim=True).clamp(min=eps * eps)
            d = d * (target / row_sq) ** beta
    u = u.T if wide else u
    return (u, d) if return_scaling else u


def orthogonal_update(g: torch.Tensor, kind: str, steps: int = 5) -> torch.Tensor:
    """The direction Muon ('muon', `steps` quick Newton–Schulz steps) or Aurora ('aurora') applies
    for Nesterov momentum g, scaled by sqrt(max(1, rows/cols))."""
    x = aurora_polar(g) if kind == "aurora" else newton_schulz(g, steps)
    return x * max(1.0, g.size(0) / g.size(1)) ** 0.5


class MatrixOptimizer(torch.optim.Optimizer):
    """One optimizer, two kinds of parameter group: `kind = 'muon' | 'aurora'` groups take the
    orthogonalised momentum update, `kind = 'adamw'` groups take AdamW. One object keeps the
    trainer, its checkpoints and `--resume` unaware of the split."""

    def __init__(self, groups: list[dict], lr: float = 0.02, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay,
                        kind="adamw")
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["kind"] == "adamw":
                    self._adamw(p, group)
                else:
                    self._matrix(p, group)
        return loss

    def _matrix(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        nesterov = p.grad.add(buf, alpha=group["momentum"])
        update = orthogonal_update(nesterov, group["kind"]).to(p.dtype)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    return p.dim() == 2 and not name.startswith(VOCAB_MATRICES)


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """train.optimizer = 'adamw': AdamW, decay on matrices (embeddings included), none on norms,
    biases and scalars. 'muon' | 'aurora': hidden matrices at train.matrix_lr, the rest AdamW at
    train.lr. Every group records its `base_lr`; the schedule multiplies it."""
    t = config.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if t.optimizer == "adamw":
        groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": t.weight_decay},
                  {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
        for g in groups:
            g["base_lr"] = t.lr
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
    matrices = [p for n, p in named if is_hidden_matrix(n, p)]
    vocab = [p for n, p in named if not is_hidden_matrix(n, p) and p.dim() >= 2]
    small = [p for _, p in named if p.dim() < 2]
    groups = [{"params": matrices, "kind": t.optimizer, "lr": t.matrix_lr, "base_lr": t.matrix_lr,
               "weight_decay": t.weight_decay},
              {"params": vocab, "kind": "adamw", "lr": t.lr, "base_lr": t.lr,
               "weight_decay": t.weight_decay},
              {"params": small, "kind": "adamw", "lr": t.lr, "base_lr": t.lr, "weight_decay": 0.0}]
    return MatrixOptimizer([g for g in groups if g["params"]], momentum=t.momentum,
                           betas=(t.beta1, t.beta2))
