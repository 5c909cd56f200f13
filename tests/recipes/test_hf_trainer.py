"""Recipe: stochopt's optimizers in a Hugging Face ``Trainer`` (docs/recipes.md), against torch.optim's, with a
tiny GPT-2 built from a config (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

import stochopt
from stochopt.training import WarmupDecayLR, param_groups

transformers = pytest.importorskip("transformers")  # a test dependency: missing, the suite's install is broken
STEPS = 6


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def token_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (24, 16), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer(model, tmp_path, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-3,
        weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=2, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=token_batches(), **kwargs)


def test_optimizer_cls_and_kwargs_trains_as_torch_adamw(tmp_path):
    """The Trainer builds its own decay groups and schedule around the class it is given: stochopt.AdamW then
    gives torch.optim.AdamW's weights (float32 rounding)."""
    kwargs = {"betas": (0.9, 0.999), "eps": 1e-8}
    models = {}
    for name, cls in (("torch", torch.optim.AdamW), ("stochopt", stochopt.AdamW)):
        model = tiny_gpt2()
        run = trainer(model, tmp_path / name, optimizer_cls_and_kwargs=(cls, kwargs))
        run.train()
        assert isinstance(run.optimizer.optimizer, cls)
        assert sorted(g["weight_decay"] for g in run.optimizer.param_groups) == [0.0, 0.1]
        models[name] = model
    reference = dict(models["torch"].named_parameters())
    for name, p in models["stochopt"].named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(
        reference["transformer.h.0.attn.c_attn.weight"], tiny_gpt2().transformer.h[0].attn.c_attn.weight
    )


def test_optimizers_tuple_with_stochopt_groups_and_schedule(tmp_path):
    """``optimizers=(opt, scheduler)``: stochopt's decay groups and schedule, stepped by the Trainer once a step."""
    model = tiny_gpt2()
    opt = stochopt.AdamW(param_groups(model, weight_decay=0.1), lr=1e-3)
    schedule = WarmupDecayLR(opt, warmup_steps=2, total_steps=STEPS)
    run = trainer(model, tmp_path, optimizers=(opt, schedule))
    result = run.train()
    assert run.optimizer.optimizer is opt and schedule.last_epoch == STEPS
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0] * len(opt.param_groups), abs=1e-12)
    decay = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert decay["transformer.h.0.attn.c_attn.weight"] == 0.1 and decay["transformer.h.0.ln_1.weight"] == 0.0
    assert decay["transformer.wte.weight"] == 0.0  # an embedding: no decay
    assert all(opt.state[p]["step"] == STEPS for g in opt.param_groups for p in g["params"])
    assert result.training_loss < 4.3  # ln(64) = 4.16 at the start, and the run moved
