"""The same optimizer and schedule inside a PyTorch Lightning ``LightningModule``.

``configure_optimizers`` returns stochopt's AdamW on ``param_groups(model)`` and a ``WarmupDecayLR`` stepped
every batch; Lightning then does what the plain loop of ``train_digits.py`` does by hand: bfloat16 autocast
(``precision="bf16-mixed"``), gradient clipping by norm, and accumulation of 2 batches per step.

Run: ``python examples/lightning_digits.py [--steps 200]``. Needs Lightning and scikit-learn
(``pip install -e ".[examples]"``); stochopt itself does not depend on Lightning.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

import stochopt
from stochopt.training import WarmupDecayLR, param_groups

sys.path.insert(0, str(Path(__file__).parent))
from train_digits import make_model  # noqa: E402  (the sibling example's model)

from stochopt.data import digits  # noqa: E402


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float, total_steps: int) -> None:
        super().__init__()
        self.model, self.lr, self.total_steps = make_model(), lr, total_steps

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = stochopt.AdamW(param_groups(self.model, weight_decay=0.05), lr=self.lr)
        schedule = WarmupDecayLR(opt, warmup_steps=self.total_steps // 10, total_steps=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    L.seed_everything(0, verbose=False)
    train, val = digits()
    module = DigitsClassifier(args.lr, args.steps)
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, precision="bf16-mixed", gradient_clip_val=5.0,
        accumulate_grad_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(train, batch_size=64, shuffle=True))
    with torch.no_grad():
        x, y = val.tensors
        accuracy = (module.model(x).argmax(1) == y).float().mean().item()
    print(f"optimizer steps {trainer.global_step}, validation accuracy {accuracy:.3f}")
    return {"val_accuracy": accuracy, "steps": trainer.global_step}


if __name__ == "__main__":
    main()
