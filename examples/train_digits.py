"""Every training technique of ``stochopt.training`` switched on, on scikit-learn's bundled 8x8 digits.

An MLP learns the digits with stochopt's AdamW and:
- parameter groups: no weight decay for biases and norm weights, layer-wise lr decay;
- a batch-size ramp (32 to 256 over the first 40% of the steps) driving the DataLoader, with the lr scaled
  by the square-root rule, multiplied into a warmup + cosine schedule;
- gradient accumulation: each batch runs as micro-batches of at most 64 examples;
- adaptive gradient clipping (unit-wise, Brock et al. 2021) and total-norm clipping, the norm logged;
- bfloat16 parameters with float32 master weights (``--precision bf16-master``, the default), bfloat16
  autocast with float32 weights (``--precision autocast``), or plain float32 (``--precision fp32``).

Run: ``python examples/train_digits.py [--steps 300] [--precision bf16-master]`` (seconds on a 2-core CPU).
Needs scikit-learn (``pip install -e ".[examples]"``).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import stochopt
from stochopt.data import digits
from stochopt.training import (
    BatchSizeRamp,
    MasterWeights,
    MixedPrecision,
    WarmupDecayLR,
    accumulate_gradients,
    clip_gradients,
    param_groups,
    split_batch,
)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(),
        nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU(),
        nn.Linear(128, 10),
    )  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    dtype = next(model.parameters()).dtype
    return (model(x.to(dtype)).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--precision", choices=["bf16-master", "autocast", "fp32"], default="bf16-master")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train, val = digits(args.seed)
    model = make_model()
    if args.precision == "bf16-master":
        model = model.to(torch.bfloat16)
    groups = param_groups(model, weight_decay=0.05, lr=args.lr, layer_decay=0.8)
    opt = stochopt.AdamW(groups, lr=args.lr)
    if args.precision == "bf16-master":
        opt = MasterWeights(opt)
    mp = MixedPrecision("cpu", enabled=args.precision == "autocast")

    ramp = BatchSizeRamp(32, 256, duration=int(0.4 * args.steps), mode="step", stages=3, lr_rule="sqrt")
    sampler = ramp.batch_sampler(RandomSampler(train, generator=torch.Generator().manual_seed(args.seed)))
    loader = DataLoader(train, batch_sampler=sampler)
    schedule = WarmupDecayLR(opt, warmup_steps=args.steps // 10, total_steps=args.steps, multiplier=ramp.lr_scale)
    dtype = next(model.parameters()).dtype

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        with mp.autocast():
            return nn.functional.cross_entropy(model(x.to(dtype)).float(), y)

    step, epoch = 0, 0
    while step < args.steps:
        for x, y in loader:
            opt.zero_grad()
            loss = accumulate_gradients(model, split_batch((x, y), 64), loss_fn)
            # the last layer stays out of adaptive clipping, as the NFNet paper does
            clip = clip_gradients(list(model.parameters())[:-2], agc=0.05, max_norm=5.0)
            opt.step()
            schedule.step()
            step += 1
            if step % 50 == 0 or step == args.steps:
                print(
                    f"step {step:4d}  batch {len(x):3d}  lr {opt.param_groups[-1]['lr']:.2e}  "
                    f"loss {loss.item():.4f}  grad norm {float(clip.norm):.3f}  clipped units "
                    f"{int(clip.clipped_units)}  val acc {accuracy(model, val):.3f}",
                    flush=True,
                )
            if step == args.steps:
                break
        epoch += 1
    result = {"val_accuracy": accuracy(model, val), "loss": loss.item(), "epochs": epoch}
    if isinstance(opt, MasterWeights):
        memory = opt.memory()
        result["bytes_per_param"] = memory.bytes_per_param
        print(
            f"model states: {memory.total / 1e6:.2f} MB = {memory.bytes_per_param:.1f} bytes/param "
            f"(params {memory.params}, grads {memory.grads}, master {memory.master_weights}, "
            f"optimizer {memory.optimizer_state} bytes)"
        )
    print(f"final validation accuracy {result['val_accuracy']:.3f}")
    assert math.isfinite(result["loss"])
    return result


if __name__ == "__main__":
    main()
