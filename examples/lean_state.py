"""Memory-lean AdamW against float32 AdamW: the final validation loss on the char-GPT and digits workloads
(several seeds, the same hyperparameters and steps), and the fused step's speed.

    python examples/lean_state.py                    # both workloads, 3 seeds, then the speed
    python examples/lean_state.py --steps 100 --seeds 1 --workloads digits_mlp --speed-params 0   # a quick look

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


def quality(workloads: list[str], seeds: int, steps: dict[str, int]) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for name in workloads:
        workload = load_workload(name)
        workload.setup()
        results[name] = {}
        for config in CONFIGS:
            losses = []
            for seed in range(seeds):
                start = time.perf_counter()
                losses.append(train(workload, config, seed, steps[name]))
                print(f"{name} {config} seed {seed}: {losses[-1]:.4f} ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
            results[name][config] = losses
    return results


def speed(total_params: int, steps: int = 20) -> dict[str, float]:
    """Params/s of AdamW's fused step (the compiled kernel) per state storage, interleaved rounds, min time."""
    shapes = model_like_shapes(total_params)
    runs = {}
    for label, options in (
        ("fp32 state", {}),
        ("bf16 state", {"state_dtype": BF16}),
        ("int8 state", {"state_dtype": "int8"}),
    ):
        params = make_params(shapes)
        opt = stochopt.AdamW(params, lr=1e-3, fused=True, **options)
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
    return {label: n / min(times) for label, (_, times) in runs.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="char_gpt,digits_mlp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="steps per run (default: char_gpt 400, digits_mlp 1500)")
    parser.add_argument("--speed-params", type=int, default=30_000_000, help="0: skip the speed measurement")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    steps = {"char_gpt": 400, "digits_mlp": 1500}
    steps = {name: args.steps or steps.get(name, 500) for name in workloads}
    results = quality(workloads, args.seeds, steps)
    for name, by_config in results.items():
        print(f"\n{name}, {steps[name]} steps, AdamW {HYPERPARAMETERS}, {args.seeds} seeds: final validation loss")
        print("| configuration | mean | spread (max - min) | mean - fp32 mean |\n|---|---|---|---|")
        reference = statistics.mean(by_config["fp32"])
        for config, losses in by_config.items():
            mean = statistics.mean(losses)
            print(f"| {config} | {mean:.4f} | {max(losses) - min(losses):.4f} | {mean - reference:+.4f} |")
    out = {"quality": results}
    if args.speed_params:
        rates = speed(args.speed_params)
        print(f"\nfused AdamW step, {args.speed_params:,} parameters: params/s relative to float32 state")
        for label, rate in rates.items():
            print(f"| {label} | {rate / 1e6:.0f} M params/s | {rate / rates['fp32 state']:.2f}x |")
        out["speed"] = rates
    return out


if __name__ == "__main__":
    main()
