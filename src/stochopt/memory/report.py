"""The estimate as a table, a side-by-side comparison of optimizers, and a stacked bar chart."""

from __future__ import annotations

from collections.abc import Sequence

from stochopt.extras import require
from stochopt.memory.estimate import MemoryEstimate

LABELS = {
    "params": "parameters", "grads": "gradients", "optimizer_state": "optimizer state",
    "master_weights": "master weights", "activations": "activations", "buffers": "temporary buffers",
}  # fmt: skip


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def format_table(estimates: Sequence[MemoryEstimate]) -> str:
    """Rows: the items, model states and total; one column per estimate (GB = 1e9 bytes, as the seeds)."""
    first = estimates[0]
    header = (
        f"training memory per device: {first.num_params:,} parameters, {first.devices} device(s), "
        f"ZeRO stage {first.zero_stage}"
    )
    width = max(16, *(len(e.optimizer) + 2 for e in estimates))
    lines = [header, f"{'':<20}" + "".join(f"{e.optimizer:>{width}}" for e in estimates)]
    for item in MemoryEstimate.ITEMS:
        lines.append(f"{LABELS[item]:<20}" + "".join(f"{gigabytes(e.items()[item]):>{width}}" for e in estimates))
    lines.append(f"{'model states':<20}" + "".join(f"{gigabytes(e.model_states):>{width}}" for e in estimates))
    lines.append(f"{'total':<20}" + "".join(f"{gigabytes(e.total):>{width}}" for e in estimates))
    per_param = "".join(f"{e.model_states / e.num_params:>{width - 6}.2f} B/par" for e in estimates)
    lines.append(f"{'model states/param':<20}" + per_param)
    lines += [f"note: {note}" for note in dict.fromkeys(n for e in estimates for n in e.notes)]
    return "\n".join(lines)


def plot_memory(estimates: Sequence[MemoryEstimate], path: str) -> None:
    """A stacked bar per estimate, one color per item, in GB."""
    require("matplotlib", feature="the memory plot")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.6 * len(estimates) + 4, 4.5), layout="constrained")
    ax = fig.add_subplot()
    bottoms = [0.0] * len(estimates)
    names = [e.optimizer for e in estimates]
    for item in MemoryEstimate.ITEMS:
        heights = [e.items()[item] / 1e9 for e in estimates]
        if any(heights):
            ax.bar(names, heights, bottom=bottoms, label=LABELS[item])
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set(ylabel="GB per device", title=f"training memory, {estimates[0].num_params / 1e9:.3g}B parameters")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
