"""Batch-size ramps: sizes and lr scaling against the rule written out here; the sampler follows the ramp and
resumes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from stochopt.training import BatchSizeRamp, WarmupDecayLR


def linear_rule(x, b0, b1, multiple=1):
    size = math.floor(b0 + (b1 - b0) * min(x, 1.0)) // multiple * multiple
    return min(max(size, b0), b1)


def test_linear_by_steps():
    ramp = BatchSizeRamp(16, 256, duration=100)
    for t in [0, 1, 10, 37, 50, 99, 100, 500]:
        assert ramp.batch_size(t) == linear_rule(t / 100, 16, 256), t
    assert ramp.batch_size(50) == 136 and ramp.batch_size(100) == 256


def test_linear_rounds_down_to_a_multiple():
    ramp = BatchSizeRamp(32, 512, duration=64, multiple_of=32)
    sizes = [ramp.batch_size(t) for t in range(80)]
    assert all(s % 32 == 0 for s in sizes) and sizes[0] == 32 and sizes[-1] == 512
    assert sizes == [linear_rule(t / 64, 32, 512, 32) for t in range(80)]
    assert sizes == sorted(sizes)


def test_stepwise_is_geometric():
    ramp = BatchSizeRamp(32, 512, duration=400, mode="step", stages=4)
    assert [ramp.batch_size(t) for t in (0, 99, 100, 199, 200, 300, 399, 400, 1000)] == [
        32, 32, 64, 64, 128, 256, 256, 512, 512,
    ]  # fmt: skip


def test_by_examples_seen():
    ramp = BatchSizeRamp(10, 100, duration=1000, unit="examples")
    seen, t = 0, 0
    while seen < 1500:
        expected = linear_rule(seen / 1000, 10, 100)
        assert ramp.batch_size(t) == expected, t
        assert ramp.examples_before(t) == seen
        seen += expected
        t += 1
    assert ramp.batch_size(10_000) == 100


@pytest.mark.parametrize("rule, power", [("linear", 1.0), ("sqrt", 0.5), (None, 0.0)])
def test_lr_scaling_rules(rule, power):
    ramp = BatchSizeRamp(32, 512, duration=400, mode="step", lr_rule=rule)
    for t in (0, 150, 250, 399, 400):
        assert ramp.lr_scale(t) == pytest.approx((ramp.batch_size(t) / 32) ** power)


def test_lr_scale_as_a_schedule_multiplier():
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    ramp = BatchSizeRamp(32, 128, duration=20, mode="step", stages=2, lr_rule="linear")
    schedule = WarmupDecayLR(opt, 0, 40, "linear", multiplier=ramp.lr_scale)
    for t in range(40):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - t / 40) * ramp.batch_size(t) / 32)
        opt.step()
        schedule.step()


def test_sampler_draws_the_ramps_sizes_and_resumes():
    data = TensorDataset(torch.arange(100))
    ramp = BatchSizeRamp(4, 20, duration=10)
    sampler = ramp.batch_sampler(SequentialSampler(data))
    loader = DataLoader(data, batch_sampler=sampler)
    assert len(sampler) == len(list(iter(sampler.__class__(sampler.sampler, ramp))))
    first_epoch = [len(b[0]) for b in loader]
    expected, left, t = [], 100, 0
    while left >= ramp.batch_size(t):  # the incomplete last batch of an epoch is dropped
        expected.append(ramp.batch_size(t))
        left -= expected[-1]
        t += 1
    assert first_epoch == expected and sampler.step == len(expected)
    state = sampler.state_dict()
    second_epoch = [len(b[0]) for b in loader]
    resumed = ramp.batch_sampler(SequentialSampler(data))
    resumed.load_state_dict(state)
    assert [len(b[0]) for b in DataLoader(data, batch_sampler=resumed)] == second_epoch
    assert all(s == 20 for s in second_epoch[1:])


def test_sampler_sees_every_index_once_per_epoch_but_the_dropped_tail():
    data = TensorDataset(torch.arange(50))
    sampler = BatchSizeRamp(8, 8, duration=1).batch_sampler(RandomSampler(data))
    indices = [i for batch in sampler for i in batch]
    assert len(indices) == 48 and len(set(indices)) == 48


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(start=0, end=8, duration=5), "start"),
        (dict(start=4, end=8, duration=0), "duration"),
        (dict(start=4, end=8, duration=5, mode="cubic"), "mode"),
        (dict(start=4, end=8, duration=5, unit="epochs"), "unit"),
        (dict(start=4, end=8, duration=5, lr_rule="square"), "lr_rule"),
        (dict(start=4, end=8, duration=5, multiple_of=0), "multiple_of"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchSizeRamp(**kwargs)


def test_bad_sampler_and_step():
    ramp = BatchSizeRamp(4, 8, duration=5)
    with pytest.raises(TypeError, match="sampler"):
        ramp.batch_sampler(42)
    with pytest.raises(ValueError, match="step"):
        ramp.batch_size(-1)
