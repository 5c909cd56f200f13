"""SWA and EMA against averages computed by hand from weight snapshots; the SWALR hand-over, batch-norm
statistics, resume, and argument validation."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from stochopt.optim.lookahead import Lookahead
from stochopt.training import EMA, SWA


def batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return x, x[:, :1] * 2.0 - x[:, 1:2] + 0.1 * torch.randn(n, 1, generator=gen, dtype=torch.float64)


def mlp(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8), nn.BatchNorm1d(8)] if batch_norm else [nn.Linear(4, 8)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(8, 1)).double()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "start, every, averaged_at",
    [(5, 3, [5, 8, 11, 14, 17]), (0, 1, list(range(20))), (0, 7, [0, 7, 14]), (19, 4, [19])],
)
def test_swa_is_the_mean_of_the_scheduled_snapshots(start, every, averaged_at):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    swa = SWA(model, opt, start=start, every=every)
    snapshots = []
    for step in range(20):
        train_step(model, opt, step)
        swa.step()
        if step in averaged_at:
            snapshots.append(snapshot(model))
    assert swa.model.n_averaged.item() == len(averaged_at)
    expected = [torch.stack(ps).mean(0) for ps in zip(*snapshots)]
    for got, want in zip(swa.model.module.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-13, atol=1e-13)


def test_swa_before_start_averages_nothing():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    swa = SWA(model, opt, start=10)
    for step in range(10):
        train_step(model, opt, step)
        swa.step()
    assert swa.model.n_averaged.item() == 0
    with pytest.raises(RuntimeError, match=r"no weights averaged yet \(10 step\(\) calls\)"):
        swa.finalize()


@pytest.mark.parametrize("decay, every", [(0.9, 1), (0.8, 3)])
def test_ema_matches_a_hand_computed_ema(decay, every):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = EMA(model, decay=decay, every=every)
    expected = None
    for step in range(20):
        train_step(model, opt, step)
        ema.step()
        if step % every == 0:
            w = snapshot(model)
            expected = w if expected is None else [decay * e + (1 - decay) * x for e, x in zip(expected, w)]
    assert ema.model.n_averaged.item() == len(range(0, 20, every))
    for got, want in zip(ema.model.module.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("make", [lambda m, o: SWA(m, o, start=10), lambda m, o: EMA(m, decay=0.9)])
def test_finalize_recomputes_batch_norm_statistics(make):
    model = mlp(batch_norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    averager = make(model, opt)
    for step in range(30):
        train_step(model, opt, step)
        averager.step()
    bn = averager.model.module[1]
    assert torch.equal(bn.running_mean, model[1].running_mean)  # copied from the trained model until finalize

    loader = [batch(100 + i) for i in range(4)]
    averager.model.eval()
    assert averager.finalize(loader) is averager.model
    assert not averager.model.training  # update_bn restores the mode
    with torch.no_grad():
        hidden = [averager.model.module[0](x) for x, _ in loader]  # the activations batch norm normalizes
    # update_bn's cumulative average: the mean over batches of each batch's mean and unbiased variance
    torch.testing.assert_close(bn.running_mean, torch.stack([h.mean(0) for h in hidden]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([h.var(0) for h in hidden]).mean(0))
    assert bn.num_batches_tracked.item() == 4
    assert not torch.allclose(bn.running_mean, model[1].running_mean)


def test_finalize_without_batch_norm_is_a_no_op():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    swa = SWA(model, opt, start=0)
    train_step(model, opt, 0)
    swa.step()
    before = snapshot(swa.model)

    def unused():
        raise AssertionError("finalize iterated the loader of a model without batch norm")
        yield

    swa.finalize(unused())
    swa.finalize()
    for a, b in zip(before, swa.model.parameters()):
        assert torch.equal(a, b)


def test_finalize_needs_a_loader_for_batch_norm():
    model = mlp(batch_norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    swa = SWA(model, opt, start=0)
    train_step(model, opt, 0)
    swa.step()
    with pytest.raises(ValueError, match="finalize needs a loader"):
        swa.finalize()


def anneal(strategy: str, t: float) -> float:
    return t if strategy == "linear" else (1 - math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("strategy, anneal_steps", [("linear", 3), ("cos", 4), ("cos", 0)])
def test_swalr_takes_over_the_lr_from_start(strategy, anneal_steps):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    start, swa_lr = 4, 0.01
    swa = SWA(model, opt, start, swa_lr=swa_lr, anneal_steps=anneal_steps, anneal_strategy=strategy,
              scheduler=before)  # fmt: skip
    used = []
    for step in range(12):
        used.append(opt.param_groups[0]["lr"])
        train_step(model, opt, step)
        swa.step()

    at_start = 0.1 * 0.9**start
    expected = [0.1 * 0.9**i for i in range(start + 1)]
    for j in range(12 - start - 1):  # step start + 1 + j
        t = min(1.0, j / anneal_steps) if anneal_steps else 1.0
        expected.append(at_start + (swa_lr - at_start) * anneal(strategy, t))
    assert used == pytest.approx(expected, rel=1e-12)
    assert before.last_epoch == start  # not stepped from start on


def test_swa_resume_is_bit_exact():
    def build():
        model = mlp(batch_norm=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        return model, opt, SWA(model, opt, 4, every=2, swa_lr=0.02, anneal_steps=6, scheduler=sched)

    def train(model, opt, swa, steps):
        for step in steps:
            train_step(model, opt, step)
            swa.step()

    model, opt, swa = build()
    train(model, opt, swa, range(8))  # mid-anneal
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), swa.state_dict()))
    model2, opt2, swa2 = build()
    for obj, state in zip((model2, opt2, swa2), saved):
        obj.load_state_dict(state)
    train(model, opt, swa, range(8, 20))
    train(model2, opt2, swa2, range(8, 20))
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    for a, b in zip(swa.model.state_dict().values(), swa2.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_resume_is_bit_exact():
    def build():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, opt, EMA(model, decay=0.9, every=2)

    model, opt, ema = build()
    for step in range(5):
        train_step(model, opt, step)
        ema.step()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ema.state_dict()))
    model2, opt2, ema2 = build()
    for obj, state in zip((model2, opt2, ema2), saved):
        obj.load_state_dict(state)
    for step in range(5, 12):
        for m, o, e in ((model, opt, ema), (model2, opt2, ema2)):
            train_step(m, o, step)
            e.step()
    for a, b in zip(ema.model.state_dict().values(), ema2.model.state_dict().values()):
        assert torch.equal(a, b)


def test_swalr_on_lookahead_without_a_scheduler_warns_nothing():
    model = mlp()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=3)
    swa = SWA(model, opt, 2, swa_lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "lr_scheduler.step() before optimizer.step()"
        for step in range(8):
            train_step(model, opt, step)
            swa.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.01
    assert swa.model.n_averaged.item() == 6


def test_load_state_dict_rejects_foreign_dicts():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"not saved by SWA: it lacks \['swa_scheduler'\]"):
        SWA(model, opt, 0).load_state_dict(EMA(model).state_dict())
    swa_with_lr = SWA(model, opt, 0, swa_lr=0.01)
    train_step(model, opt, 0)
    swa_with_lr.step()
    with pytest.raises(ValueError, match="this SWA has swa_lr=None"):
        SWA(model, opt, 0).load_state_dict(swa_with_lr.state_dict())


def _model_opt():
    model = mlp()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(start=-1), ValueError, r"start must be an int >= 0, got -1"),
        (dict(start=2.5), TypeError, r"start must be an int >= 0, got float 2.5"),
        (dict(start=0, every=0), ValueError, r"every must be an int >= 1, got 0"),
        (dict(start=0, swa_lr=-0.1), ValueError, r"swa_lr must be a finite number >= 0, got -0.1"),
        (dict(start=0, swa_lr=[0.1, 0.2]), ValueError, r"one per param group \(1\), got \[0.1, 0.2\]"),
        (dict(start=0, swa_lr=0.1, anneal_steps=-2), ValueError, r"anneal_steps must be an int >= 0, got -2"),
        (dict(start=0, anneal_strategy="exp"), ValueError, r"anneal_strategy must be 'cos' or 'linear', got 'exp'"),
        (dict(start=0, scheduler="cosine"), TypeError, r"scheduler must be an lr scheduler .* got str"),
    ],
)
def test_swa_rejects_bad_arguments(kwargs, error, match):
    model, opt = _model_opt()
    with pytest.raises(error, match=match):
        SWA(model, opt, **kwargs)


def test_swa_rejects_wrong_model_optimizer_or_scheduler():
    model, opt = _model_opt()
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        SWA(list(model.parameters()), opt, 0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer instance, got type"):
        SWA(model, torch.optim.SGD, 0)
    with pytest.raises(ValueError, match="scheduler drives another optimizer"):
        SWA(model, opt, 0, scheduler=torch.optim.lr_scheduler.StepLR(other, 1))
    with pytest.raises(TypeError, match="not ReduceLROnPlateau"):
        SWA(model, opt, 0, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(decay=1.5), ValueError, r"decay must be in \[0, 1\], got 1.5"),
        (dict(decay="0.9"), TypeError, r"decay must be a number"),
        (dict(every=0), ValueError, r"every must be an int >= 1, got 0"),
        (dict(every=True), TypeError, r"every must be an int >= 1, got bool True"),
    ],
)
def test_ema_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMA(mlp(), **kwargs)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        EMA(None)
