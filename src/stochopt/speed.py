"""``stochopt speed``: the time of one optimizer step on a model-like parameter set, in every execution path.

Every figure is reported beside baselines measured in the same run (torch.optim's foreach, fused and default
implementations of the same algorithm, and pytorch_optimizer's when it is installed) and as a ratio to torch's
fused AdamW, so results compare across machines. The fused path runs its timed steps with a scheduler that
changes lr every step, and the report counts the graphs compiled meanwhile (0 is the target). Candidates of
one algorithm are timed in interleaved rounds on the same parameters, and each figure is the fastest step
(as timeit reports: the machine's interference only ever adds time).
"""

from __future__ import annotations

import gc
import importlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from stochopt.registry import list_optimizers, optimizer_entry

# The hyperparameters timed for each optimizer; torch's and pytorch_optimizer's classes get the same ones.
SPEED_CONFIGS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-2, "momentum": 0.9},
    "qhm": {"lr": 1e-2},
    "adagrad": {"lr": 1e-2},
    "rmsprop": {"lr": 1e-3},
    "adadelta": {"lr": 1.0},
    "adam": {"lr": 1e-3},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
    "qhadam": {"lr": 1e-3},
    "nadam": {"lr": 1e-3},
    "radam": {"lr": 1e-3},
    "adabound": {"lr": 1e-3},
    "lion": {"lr": 1e-4, "weight_decay": 1e-2},
    "lazyadam": {"lr": 1e-3},
    "lamb": {"lr": 1e-3, "weight_decay": 1e-2},
    "lars": {"lr": 1e-1, "momentum": 0.9, "weight_decay": 1e-4},
    "adafactor": {"lr": 1e-2},
    "ranger": {"lr": 1e-3},
    "ademamix": {"lr": 1e-3},
    "adopt": {"lr": 1e-3},
    "mars": {"lr": 3e-3},
}
TORCH_CLASSES = {
    "sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adadelta": "Adadelta", "adam": "Adam",
    "adamw": "AdamW", "nadam": "NAdam", "radam": "RAdam", "adafactor": "Adafactor",
}  # fmt: skip
TORCH_FUSED = {"sgd", "adagrad", "adam", "adamw"}
PYTORCH_OPTIMIZER_CLASSES = {
    "qhm": "QHM", "qhadam": "QHAdam", "adabound": "AdaBound", "lion": "Lion", "radam": "RAdam", "nadam": "NAdam",
    "adamw": "AdamW", "lamb": "Lamb", "lars": "LARS", "adafactor": "AdaFactor", "ranger": "Ranger",
    "ademamix": "AdEMAMix", "adopt": "ADOPT", "mars": "MARS",
}  # fmt: skip
# pytorch_optimizer's AdaFactor keeps a first moment (beta1 = 0.9, in bfloat16) unless told not to; the paper's
# Adafactor, torch's and ours have none by default, so the same algorithm needs betas=(None, beta2). (Its beta2
# caps the paper's schedule 1 - t^-0.8 at 0.999, which changes numbers after ~5,600 steps, not the work.)
PYTORCH_OPTIMIZER_OPTIONS: dict[str, dict[str, Any]] = {"adafactor": {"betas": (None, 0.999)}}
PATHS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}, "default": {}}


@dataclass
class Measurement:
    optimizer: str
    library: str
    path: str
    step_ms: float
    params_per_s: float
    first_step_s: float
    recompiles: int | None
    ratio_to_torch_fused_adamw: float = float("nan")


def model_like_shapes(total: int = 30_000_000) -> list[tuple[int, ...]]:
    """About ``total`` parameters in ~50 tensors shaped like a transformer's: one large embedding, square and
    rectangular matrices, vectors; scaled down proportionally for small totals."""
    base: list[tuple[int, ...]] = [(32000, 256)]
    base += [(1024, 1024)] * 10 + [(2048, 512)] * 4 + [(512, 2048)] * 4 + [(512, 512)] * 6
    base += [(1024,)] * 12 + [(4096,)] * 8 + [(512,)] * 5
    scale = (total / sum(_numel(s) for s in base)) ** 0.5
    shapes = []
    for s in base:
        if len(s) == 2:
            shapes.append((max(2, round(s[0] * scale)), max(2, round(s[1] * scale))))
        else:
            shapes.append((max(2, round(s[0] * scale)),))
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).mul_(0.02).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).mul_(1e-3)
        params.append(p)
    return params


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class _Running:
    """One candidate under measurement: its optimizer, scheduler and the step times so far."""

    optimizer: Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    first_step_s: float
    times: list[float]
    recompiles: int = 0


def _start(make: Callable[[list[torch.Tensor]], Optimizer], params: list[torch.Tensor], warmup: int) -> _Running:
    opt = make(params)
    start = time.perf_counter()
    opt.step()
    first = time.perf_counter() - start
    for _ in range(warmup):
        opt.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1.0 + 0.01 * i))
    return _Running(opt, scheduler, first, [])


def _timed_steps(run: _Running, steps: int) -> None:
    before = _graphs_compiled()
    for _ in range(steps):
        start = time.perf_counter()
        run.optimizer.step()
        run.times.append(time.perf_counter() - start)
        run.scheduler.step()  # lr changes every step: the fused path must not recompile for it
    run.recompiles += _graphs_compiled() - before


def _candidates(name: str) -> list[tuple[str, str, Callable[[list[torch.Tensor]], Optimizer]]]:
    config = SPEED_CONFIGS.get(name, {})
    cls = optimizer_entry(name).cls
    out = [("stochopt", path, _maker(cls, {**config, **flags}, native=False)) for path, flags in PATHS.items()]
    if cls._native_fused is not None:  # fused=True picks torch's own kernel here: a row of its own
        out.append(("stochopt", "torch-kernel", _maker(cls, {**config, "fused": True})))
    if name in TORCH_CLASSES:
        tcls = getattr(torch.optim, TORCH_CLASSES[name])
        out += [("torch", "foreach", _maker(tcls, {**config, "foreach": True}))]
        if name in TORCH_FUSED:
            out += [("torch", "fused", _maker(tcls, {**config, "fused": True}))]
        out += [("torch", "default", _maker(tcls, config))]
    if name in PYTORCH_OPTIMIZER_CLASSES:
        try:
            po = importlib.import_module("pytorch_optimizer")
            options = {**config, **PYTORCH_OPTIMIZER_OPTIONS.get(name, {})}
            out += [("pytorch_optimizer", "default", _maker(getattr(po, PYTORCH_OPTIMIZER_CLASSES[name]), options))]
        except (ImportError, AttributeError):
            pass
    return out


def _maker(
    cls: type[Optimizer], kwargs: dict[str, Any], native: bool = True
) -> Callable[[list[torch.Tensor]], Optimizer]:
    """``native=False``: stochopt's compiled kernel even where ``fused=True`` would pick torch's own."""

    def make(params: list[torch.Tensor]) -> Optimizer:
        opt = cls(params, **kwargs)
        if not native:
            opt.use_native_fused = False  # type: ignore[attr-defined]
        return opt

    return make


def run_speed(
    optimizers: list[str] | None = None,
    total_params: int = 30_000_000,
    steps: int = 20,
    warmup: int = 7,
    rounds: int = 5,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Measurement], int]:
    """Time every (optimizer, library, path) on one shared parameter set; ratios use torch's fused AdamW.

    Returns the measurements and the number of parameters timed."""
    names = optimizers or [n for n in list_optimizers() if n in SPEED_CONFIGS]
    for name in names:
        optimizer_entry(name)  # unknown names fail before any timing
    shapes = model_like_shapes(total_params)
    params = make_params(shapes)
    n = sum(p.numel() for p in params)
    baseline_key = ("adamw", "torch", "fused")
    jobs = [(name, lib, path, make) for name in names for lib, path, make in _candidates(name)]
    if not any(job[:3] == baseline_key for job in jobs):
        jobs.insert(0, (*baseline_key, _maker(torch.optim.AdamW, {**SPEED_CONFIGS["adamw"], "fused": True})))
    results: list[Measurement] = []
    for name in dict.fromkeys(job[0] for job in jobs):
        group = [job for job in jobs if job[0] == name]
        running = []
        for _, lib, path, make in group:
            if progress:
                progress(f"{name}: first step, {lib} {path}")
            running.append(_start(make, params, warmup))
        # Rounds interleave the candidates, so that a slow spell of the machine hits all of them alike.
        for r in range(rounds):
            if progress:
                progress(f"{name}: round {r + 1}/{rounds}")
            for run in running:
                _timed_steps(run, max(1, steps // rounds))
        for (_, lib, path, _), run in zip(group, running):
            ms = min(run.times) * 1e3
            graphs = run.recompiles if lib == "stochopt" and path in ("fused", "torch-kernel") else None
            results.append(Measurement(name, lib, path, ms, n / (ms / 1e3), run.first_step_s, graphs))
        del running
        gc.collect()
    baseline = next(r for r in results if (r.optimizer, r.library, r.path) == baseline_key).params_per_s
    for r in results:
        r.ratio_to_torch_fused_adamw = r.params_per_s / baseline
    return results, n


def format_table(results: list[Measurement], total_params: int) -> str:
    lines = [
        f"one optimizer step on {total_params / 1e6:.1f}M float32 parameters in "
        f"{len(model_like_shapes(total_params))} tensors, {torch.get_num_threads()} threads, torch {torch.__version__}",
        f"{'optimizer':<10} {'library':<18} {'path':<12} {'ms/step':>9} {'Mparams/s':>10} {'vs torch':>9} "
        f"{'first step s':>13} {'recompiles':>10}",
    ]
    for r in results:
        recompiles = "" if r.recompiles is None else str(r.recompiles)
        lines.append(
            f"{r.optimizer:<10} {r.library:<18} {r.path:<12} {r.step_ms:>9.1f} {r.params_per_s / 1e6:>10.0f} "
            f"{r.ratio_to_torch_fused_adamw:>8.2f}x {r.first_step_s:>13.2f} {recompiles:>10}"
        )
    lines.append("'vs torch': params/s relative to torch.optim.AdamW(fused=True) measured in this run.")
    if any(r.path == "torch-kernel" for r in results):
        lines.append(
            "stochopt 'fused': its compiled kernel; 'torch-kernel': the torch kernel that fused=True picks on the "
            "CPU where torch has one (stochopt.<Optimizer>.use_native_fused = False switches it off)."
        )
    return "\n".join(lines)


def as_json(results: list[Measurement], total_params: int) -> dict[str, Any]:
    return {
        "total_params": total_params,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": [asdict(r) for r in results],
    }
