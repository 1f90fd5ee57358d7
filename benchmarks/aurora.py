"""Muon vs Aurora on the same updates: how orthogonal each direction is, how even its row norms are.

For each update G (tall m x n, or wide: then read "rows" as the columns of the tall form) it prints
the coefficient of variation (std / mean) of the row norms of Muon's and Aurora's direction, the
largest |U^T U - I| of each (0 = an exact polar factor), the cosine between the two, and the
milliseconds per call. Inputs: Gaussian, Gaussian with rows of very unequal scale (0.1 to 3),
ill-conditioned (singular values over two decades, rows over one), low rank + noise, and the real
gradients of one step of the aomts-ablation model on random tokens.

    python benchmarks/aurora.py [--threads 1] [--no-model]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mtplab.training.optimizers import aurora_polar, newton_schulz

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def ill_conditioned(rows: int, cols: int) -> torch.Tensor:
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k))
    v, _ = torch.linalg.qr(torch.randn(cols, k))
    g = u @ torch.diag(torch.logspace(-2, 0, k)) @ v.T
    scale = torch.logspace(-0.5, 0.5, max(rows, cols))[torch.randperm(max(rows, cols))]
    return g * (scale.unsqueeze(1) if rows >= cols else scale.unsqueeze(0))


def synthetic(shape: tuple[int, int]) -> list[tuple[str, torch.Tensor]]:
    rows, cols = shape
    m, n = max(shape), min(shape)
    scaled = torch.randn(m, n) * torch.linspace(0.1, 3, m)[torch.randperm(m)].unsqueeze(1)
    return [("gaussian", torch.randn(rows, cols)),
            ("rows 0.1-3x", scaled if rows >= cols else scaled.T),
            ("ill-conditioned", ill_conditioned(rows, cols)),
            ("rank 8 + noise", torch.randn(rows, 8) @ torch.randn(8, cols) + 0.1 * torch.randn(rows, cols))]


def model_gradients() -> list[tuple[str, torch.Tensor]]:
    from mtplab.config import load_config
    from mtplab.models.transformer import Transformer
    from mtplab.training.losses import backward_heads, head_weights

    config = load_config(RECIPES / "aomts-ablation.toml").model
    config.vocab_size = 2048
    model = Transformer(config).train()
    ids = torch.randint(0, config.vocab_size, (8, config.max_seq_len + 1))
    backward_heads(model, ids[:, :-1], ids[:, 1:], head_weights(config))
    wanted = ("blocks.1.mlp.", "blocks.1.attn.", "heads.")
    short = lambda name: (name.removesuffix(".weight").replace("heads.modules_.0.block.", "mtp block ")
                          .replace("heads.modules_.0.", "mtp ").replace("blocks.1.", "block 1 "))
    return [(short(name), p.grad) for name, p in model.named_parameters()
            if p.dim() == 2 and p.grad is not None and name.startswith(wanted)
            and "lm_head" not in name and "wte" not in name]


def measure(g: torch.Tensor, f) -> tuple[torch.Tensor, float]:
    f(g)  # warm-up
    t0 = time.perf_counter()
    u = f(g)
    return u, (time.perf_counter() - t0) * 1e3


def stats(u: torch.Tensor) -> tuple[float, float]:
    tall = u if u.size(0) >= u.size(1) else u.T
    norms = tall.norm(dim=1)
    orth = float((tall.T @ tall - torch.eye(tall.size(1))).abs().max())
    return float(norms.std() / norms.mean()), orth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--no-model", action="store_true", help="skip the model's gradients")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [(f"{kind}", g) for shape in [(352, 128), (128, 352)] for kind, g in synthetic(shape)]
    if not args.no_model:
        cases += model_gradients()
    head = (f"{'update':<26} {'shape':>9} | {'row-norm CV':^15} | {'max |UᵀU - I|':^15} | "
            f"{'cos':>5} | {'ms per call':^13}")
    print(head)
    print(f"{'':<26} {'':>9} | {'Muon':>7} {'Aurora':>7} | {'Muon':>7} {'Aurora':>7} | {'':>5} | "
          f"{'Muon':>6} {'Aurora':>6}")
    print("-" * len(head))
    for name, g in cases:
        muon, muon_ms = measure(g, newton_schulz)
        aurora, aurora_ms = measure(g, aurora_polar)
        (muon_cv, muon_orth), (aurora_cv, aurora_orth) = stats(muon), stats(aurora)
        cos = float((muon * aurora).sum() / (muon.norm() * aurora.norm()))
        shape = f"{g.size(0)}x{g.size(1)}"
        print(f"{name:<26} {shape:>9} | {muon_cv:7.3f} {aurora_cv:7.3f} | {muon_orth:7.3f} "
              f"{aurora_orth:7.3f} | {cos:5.3f} | {muon_ms:6.2f} {aurora_ms:6.2f}")
    print("\nrow norms: of the tall form (a wide matrix's columns). Square matrices: Aurora is the "
          "plain polar factor (no row freedom to balance); where a gradient's smallest singular values "
          "sit far below the rest, 12 steps leave them short of 1, hence |UᵀU - I| above 0 there.")


if __name__ == "__main__":
    main()
