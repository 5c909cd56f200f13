"""Pieces every built-in workload shares: seeded model construction, seeded endless batching, the stored targets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources

import torch

TARGETS_FILE = "targets.json"


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU generator seeded, restoring the caller's random state afterwards, so that
    building a model neither depends on nor disturbs whatever the runner does with the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_positive_ints(**values: int) -> None:
    """A ValueError naming the first of ``values`` that is not a positive int (bools refused)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_batch_size(batch_size: int, limit: int | None = None) -> int:
    """The batch size as a positive int (at most ``limit`` examples), or a ValueError naming it."""
    check_positive_ints(batch_size=batch_size)
    if limit is not None and batch_size > limit:
        raise ValueError(f"batch_size must be at most the {limit} training examples, got {batch_size!r}")
    return batch_size


def shuffled_batches(tensors: tuple[torch.Tensor, ...], batch_size: int, seed: int) -> Iterator[tuple]:
    """Endless epochs over the rows of ``tensors``: a fresh seeded permutation per epoch, the last partial batch
    of each epoch dropped so that every batch has the same size (and a compiled step never sees a new shape)."""
    n = len(tensors[0])
    check_batch_size(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield tuple(t[idx] for t in tensors)


def load_targets() -> dict[str, dict]:
    """The stored validation targets, ``{workload name: {"target": value, "source": how it was obtained}}``."""
    text = resources.files(__package__).joinpath(TARGETS_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def stored_target(name: str) -> float:
    """The stored target of one built-in workload (read when its class is defined)."""
    targets = load_targets()
    if name not in targets:
        raise ValueError(f"no target stored for workload {name!r} in {TARGETS_FILE}; known: {sorted(targets)}")
    return float(targets[name]["target"])
