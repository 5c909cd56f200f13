"""``stochopt speed --matrix``: amortized step times of the matrix optimizers (Shampoo, Muon) on a set of
matrices shaped like a transformer's hidden layers, beside Adam, torch's fused AdamW and torch.optim.Muon
measured in the same run.

A matrix optimizer's steps differ: Shampoo recomputes its inverse roots every ``precondition_frequency``
steps and reuses them in between. So each figure here is the *mean* over timed windows whose length is a
multiple of that frequency (every window holds the same number of recomputations), not the fastest step.
Candidates are timed in interleaved rounds on the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from stochopt.engine import checks
from stochopt.optim import Adam, Muon, Shampoo
from stochopt.speed import Measurement, _maker, _start, _timed_steps, make_params

SHAMPOO_FREQUENCY = 10
# (optimizer, library, class, hyperparameters); the first row is the baseline of the ratios
MATRIX_CANDIDATES: list[tuple[str, str, type[Optimizer], dict[str, Any]]] = [
    ("adamw", "torch", torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2, "fused": True}),
    ("adam", "stochopt", Adam, {"lr": 1e-3}),
    ("muon", "torch", torch.optim.Muon, {"lr": 0.02}),
    ("muon", "stochopt", Muon, {"lr": 0.02}),  # Newton-Schulz in default_ns_dtype (float32 on most CPUs)
    ("muon", "stochopt-bf16", Muon, {"lr": 0.02, "ns_dtype": torch.bfloat16}),  # torch's precision
    ("shampoo", "stochopt", Shampoo, {"lr": 1e-2, "precondition_frequency": SHAMPOO_FREQUENCY}),
]


def matrix_shapes(total: int = 3_000_000) -> list[tuple[int, int]]:
    """About ``total`` parameters in 24 matrices: a transformer block's square, wide and tall matrices."""
    base = [(1024, 1024)] * 10 + [(2048, 512)] * 4 + [(512, 2048)] * 4 + [(512, 512)] * 6
    scale = (total / sum(a * b for a, b in base)) ** 0.5
    return [(max(2, round(a * scale)), max(2, round(b * scale))) for a, b in base]


def run_matrix_speed(
    total_params: int = 3_000_000,
    steps: int = 20,
    warmup: int = 2,
    rounds: int = 2,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Measurement], int]:
    """Mean step time of each candidate over ``steps`` steps (rounded up so that each of the ``rounds``
    windows is a multiple of Shampoo's precondition frequency); ratios against torch's fused AdamW."""
    checks.count("total_params", total_params, 4)
    checks.count("rounds", rounds, 1)
    per_round = -(-max(checks.count("steps", steps, 1), rounds) // rounds)
    per_round = -(-per_round // SHAMPOO_FREQUENCY) * SHAMPOO_FREQUENCY
    params = make_params(matrix_shapes(total_params))
    n = sum(p.numel() for p in params)
    running = []
    for name, library, cls, hp in MATRIX_CANDIDATES:
        if progress:
            progress(f"{name} ({library}): first step")
        running.append(_start(_maker(cls, hp), params, warmup))
    for r in range(rounds):
        if progress:
            progress(f"round {r + 1}/{rounds}: {per_round} steps each")
        for run in running:
            _timed_steps(run, per_round)
    results = []
    for (name, library, _, _), run in zip(MATRIX_CANDIDATES, running):
        ms = sum(run.times) / len(run.times) * 1e3
        results.append(Measurement(name, library, "default", ms, n / (ms / 1e3), run.first_step_s, None))
    for m in results:
        m.ratio_to_torch_fused_adamw = m.params_per_s / results[0].params_per_s
    return results, n


def format_matrix_table(results: list[Measurement], total_params: int) -> str:
    shapes = matrix_shapes(total_params)
    lines = [
        f"amortized optimizer step on {total_params / 1e6:.2f}M float32 parameters in {len(shapes)} matrices "
        f"({shapes[0][0]}x{shapes[0][1]} ... {shapes[-1][0]}x{shapes[-1][1]}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; Shampoo recomputes its roots every {SHAMPOO_FREQUENCY} steps",
        f"{'optimizer':<10} {'library':<14} {'ms/step':>9} {'Mparams/s':>10} {'vs torch AdamW':>15} "
        f"{'first step s':>13}",
    ]
    for r in results:
        lines.append(
            f"{r.optimizer:<10} {r.library:<14} {r.step_ms:>9.1f} {r.params_per_s / 1e6:>10.1f} "
            f"{r.ratio_to_torch_fused_adamw:>14.3f}x {r.first_step_s:>13.2f}"
        )
    lines.append("ms/step: mean over whole recomputation periods; 'vs torch AdamW': params/s relative to "
                 "torch.optim.AdamW(fused=True) in this run.")  # fmt: skip
    return "\n".join(lines)
