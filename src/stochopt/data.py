"""Small datasets that ship with installed packages (no download): shared by the examples, the distributed
trainer and the benchmark's workloads."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def digits(seed: int = 0, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 8x8 digits (bundled with scikit-learn), pixels scaled to [0, 1] as 64 features,
    split train/validation by a seeded permutation (80/20 by default)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = round((1.0 - val_fraction) * len(x))
    train, val = order[:cut], order[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])
