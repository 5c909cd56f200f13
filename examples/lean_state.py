"""Memory-lean AdamW against float32 AdamW: the final validation loss on the char-GPT and digits workloads
(several seeds, the same hyperparameters and steps), and the fused step's speed.

    python examples/lean_state.py                    # both workloads, 3 seeds, then the speed
    python examples/lean_state.py --steps 100 --seeds 1 --workloads digits_mlp --speed-params 0   # a quick look
    python examples/lean_state.py --workloads "" --speed-matrix 4096x2048   # the speed alone, on one matrix
    python examples/lean_state.py --workloads char_gpt --configs "fp32,bf16 SR + int8" --speed-params 0

The speed rows include bitsandbytes' and torchao's 8-bit AdamW where they are installed.

The configurations (see docs/lean.md):

- ``fp32``: float32 weights and state, the reference;
- ``bf16 state``: float32 weights, bfloat16 moments (``state_dtype=torch.bfloat16``);
- ``int8 state``: float32 weights, 8-bit block-wise moments (``state_dtype="int8"``);
- ``bf16 nearest``: bfloat16 weights rounded to nearest after each step (no master: the seeds' failure);
- ``bf16 SR``: bfloat16 weights with stochastic rounding (``weight_rounding="stochastic"``);
- ``bf16 Kahan``: bfloat16 weights with a bfloat16 compensation buffer (``weight_rounding="compensated"``);
- ``bf16 SR + int8``: both: 2 + 2 + 2 bytes a parameter of model states.

The bfloat16 models also run forward and backward in bfloat16; every model is evaluated in float32 (a float32
copy of its weights), so that what differs is what the optimizer kept. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import stochopt
from stochopt.bench.workloads import load_workload
from stochopt.speed import make_params, model_like_shapes

BF16 = torch.bfloat16
CONFIGS: dict[str, tuple[torch.dtype, dict]] = {
    "fp32": (torch.float32, {}),
    "bf16 state": (torch.float32, {"state_dtype": BF16}),
    "int8 state": (torch.float32, {"state_dtype": "int8"}),
    "bf16 nearest": (BF16, {}),
    "bf16 SR": (BF16, {"weight_rounding": "stochastic"}),
    "bf16 Kahan": (BF16, {"weight_rounding": "compensated"}),
    "bf16 SR + int8": (BF16, {"weight_rounding": "stochastic", "state_dtype": "int8"}),
}
HYPERPARAMETERS = {"lr": 2e-3, "betas": (0.9, 0.99), "weight_decay": 0.01}


def validation_loss(workload, model: torch.nn.Module) -> float:
    """Validation loss of a float32 copy of ``model``: char-GPT's bits per character, the digits' nats."""
    model = copy.deepcopy(model).float()
    with torch.no_grad():
        if workload.name == "char_gpt":
            return workload.evaluate(model)
        return float(F.cross_entropy(model(workload.x_val), workload.y_val))


def train(workload, config: str, seed: int, steps: int) -> float:
    dtype, options = CONFIGS[config]
    model = workload.init_model(seed).to(dtype)
    opt = stochopt.AdamW(model.parameters(), **HYPERPARAMETERS, **options)
    batches = workload.train_batches(workload.batch_size, seed)
    for _ in range(steps):
        batch = next(batches)
        batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)
        opt.zero_grad()
        workload.loss(model, batch).backward()
        opt.step()
    return validation_loss(workload, model)


def quality(
    workloads: list[str], seeds: int, steps: dict[str, int], configs: list[str] | None = None
) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for name in workloads:
        workload = load_workload(name)
        workload.setup()
        results[name] = {}
        for config in configs or list(CONFIGS):
            losses = []
            for seed in range(seeds):
                start = time.perf_counter()
                losses.append(train(workload, config, seed, steps[name]))
                print(f"{name} {config} seed {seed}: {losses[-1]:.4f} ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
            results[name][config] = losses
    return results


def peer_8bit_adamw() -> dict[str, type]:
    """The 8-bit AdamW of bitsandbytes and torchao, where installed (neither is a dependency: ``pip install
    bitsandbytes torchao`` to have them beside stochopt's), each with its own defaults (bitsandbytes: blocks of
    256 values on the CPU, tensors under 4096 values in float32; torchao: blocks of 256)."""
    peers = {}
    try:
        import bitsandbytes

        peers["bitsandbytes AdamW8bit"] = bitsandbytes.optim.AdamW8bit
    except ImportError:
        pass
    try:
        from torchao.optim import AdamW8bit

        peers["torchao AdamW8bit"] = AdamW8bit
    except ImportError:
        pass
    return peers


def speed(total_params: int, steps: int = 20, matrix: tuple[int, int] | None = None) -> tuple[dict, dict]:
    """Params/s of AdamW's fused step per state storage (stochopt's compiled kernel in each of its rows), and of
    the peers' 8-bit AdamW where installed: interleaved rounds, the minimum time of each. On ``total_params``
    of model-like shapes, or on one matrix of shape ``matrix``."""
    shapes = [matrix] if matrix else model_like_shapes(total_params)
    makers = {
        label: (lambda ps, options=options: stochopt.AdamW(ps, lr=1e-3, fused=True, **options))
        for label, options in (
            ("fp32 state", {}),
            ("bf16 state", {"state_dtype": BF16}),
            ("int8 state", {"state_dtype": "int8"}),
        )
    }
    makers.update({label: (lambda ps, cls=cls: cls(ps, lr=1e-3)) for label, cls in peer_8bit_adamw().items()})
    runs = {}
    for label, make in makers.items():
        params = make_params(shapes)
        opt = make(params)
        opt.use_native_fused = False  # stochopt's kernel in every row (torch's own exists for float32 only)
        start = time.perf_counter()
        for _ in range(3):
            opt.step()
        print(f"speed {label}: warmed up in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        runs[label] = (opt, [])
    for _ in range(5):
        for opt, times in runs.values():
            for _ in range(max(1, steps // 5)):
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
    n = sum(math.prod(s) for s in shapes)
    return {label: n / min(times) for label, (_, times) in runs.items()}, {
        label: eight_bit_fraction(opt) for label, (opt, _) in runs.items()
    }


def eight_bit_fraction(opt: torch.optim.Optimizer) -> float:
    """The fraction of the parameters whose state ``opt`` keeps in 8 bits: a uint8 state tensor or a tensor
    subclass (torchao's). torchao quantizes only tensors whose size its block size divides, and keeps the
    others in float32: its row is then float32 state, and this column says so."""
    params = [p for group in opt.param_groups for p in group["params"]]

    def eight_bit(value: object) -> bool:
        return isinstance(value, torch.Tensor) and (value.dtype == torch.uint8 or type(value) is not torch.Tensor)

    quantized = sum(p.numel() for p in params if any(map(eight_bit, opt.state[p].values())))
    return quantized / sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="char_gpt,digits_mlp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="steps per run (default: char_gpt 400, digits_mlp 1500)")
    parser.add_argument("--configs", help=f"comma-separated subset of: {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--speed-params", type=int, default=30_000_000, help="0: skip the speed measurement")
    parser.add_argument("--speed-matrix", metavar="ROWSxCOLS", help="measure the speed on one matrix instead")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else None
    unknown = [c for c in configs or [] if c not in CONFIGS]
    if unknown or configs == []:
        parser.error(f"--configs must name some of {', '.join(CONFIGS)}, got {args.configs!r}")
    matrix = None
    if args.speed_matrix:
        try:
            matrix = tuple(int(n) for n in args.speed_matrix.lower().split("x"))
        except ValueError:
            matrix = ()
        if len(matrix) != 2 or min(matrix) < 1:
            parser.error(f"--speed-matrix must be ROWSxCOLS (positive), got {args.speed_matrix!r}")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    steps = {"char_gpt": 400, "digits_mlp": 1500}
    steps = {name: args.steps or steps.get(name, 500) for name in workloads}
    results = quality(workloads, args.seeds, steps, configs)
    for name, by_config in results.items():
        print(f"\n{name}, {steps[name]} steps, AdamW {HYPERPARAMETERS}, {args.seeds} seeds: final validation loss")
        print("| configuration | mean | spread (max - min) | mean - fp32 mean |\n|---|---|---|---|")
        reference = statistics.mean(by_config["fp32"]) if "fp32" in by_config else None  # --configs may omit it
        for config, losses in by_config.items():
            mean = statistics.mean(losses)
            against = f"{mean - reference:+.4f}" if reference is not None else "-"
            seeds = ", ".join(f"{loss:.4f}" for loss in losses)
            print(f"| {config} | {mean:.4f} | {max(losses) - min(losses):.4f} | {against} | seeds: {seeds}")
    out = {"quality": results}
    if args.speed_params:
        rates, fractions = speed(args.speed_params, matrix=matrix)
        what = f"one {matrix[0]}x{matrix[1]} matrix" if matrix else f"{args.speed_params:,} parameters"
        print(f"\nAdamW step, {what}: params/s relative to stochopt's float32 state")
        print("| state | params/s | against float32 state | parameters with 8-bit state |\n|---|---|---|---|")
        for label, rate in rates.items():
            print(f"| {label} | {rate / 1e6:.0f} M | {rate / rates['fp32 state']:.3f}x | {fractions[label]:.0%} |")
        out["speed"] = rates
    return out


if __name__ == "__main__":
    main()
