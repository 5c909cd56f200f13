"""Per-step statistics (engine/statistics.py): computed inside the update, in every execution path, against
the same quantities computed here outside the optimizer; the algorithms' own scalars; the adapters."""

from __future__ import annotations

import math

import pytest
import torch

import stochopt
from stochopt.optim.muon import adjusted_lr
from stochopt.training import flat_statistics, write_statistics
from tests.conftest import PATHS, make_params, set_grads

STEPS = 3


def norm(t: torch.Tensor) -> float:
    return t.double().norm().item()


@pytest.mark.parametrize("path", [*PATHS, "user-compiled"])
def test_adamw_statistics_equal_the_norms_computed_outside(path):
    params = make_params()
    opt = stochopt.AdamW(params, lr=1e-2, weight_decay=0.1, **PATHS.get(path, {}))
    opt.track_statistics()
    step = torch.compile(opt.step) if path == "user-compiled" else opt.step
    for t in range(STEPS):
        before = [p.detach().clone() for p in params]
        set_grads(params, t)
        step()
        stats = opt.statistics
        total = 0.0
        for i, (p, old) in enumerate(zip(params, before)):
            entry = stats["params"][f"group0.param{i}"]
            change = norm(p.detach() - old)
            total += change**2
            expected = {
                "update_norm": change, "weight_norm": norm(p), "update_to_weight": change / norm(p),
                "exp_avg_norm": norm(opt.state[p]["exp_avg"]), "exp_avg_sq_norm": norm(opt.state[p]["exp_avg_sq"]),
            }  # fmt: skip
            assert entry == pytest.approx(expected, rel=1e-5), (path, t, i)
        group = stats["groups"][0]
        assert group["update_norm"] == pytest.approx(math.sqrt(total), rel=1e-5)
        assert group["lr"] == 1e-2 and group["weight_decay"] == 0.1


@pytest.mark.parametrize("path", ["loop", "foreach"])
def test_lamb_reports_its_trust_ratio(path):
    params = make_params([(40, 30), (30,)])
    opt = stochopt.Lamb(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, **PATHS[path])
    opt.track_statistics()
    for t in range(STEPS):
        before = [p.detach().clone() for p in params]
        set_grads(params, t)
        opt.step()
        for i, (p, old) in enumerate(zip(params, before)):
            state, k = opt.state[p], t + 1
            u = state["exp_avg"] / (1 - 0.9**k) / ((state["exp_avg_sq"] / (1 - 0.99**k)).sqrt() + 1e-6) + 0.01 * old
            expected = norm(old) / norm(u)  # the layer-wise trust ratio ||w|| / ||u|| (You et al., 2020)
            assert opt.statistics["params"][f"group0.param{i}"]["trust_ratio"] == pytest.approx(expected, rel=1e-5)


def test_muon_reports_its_adjusted_lr_and_prodigy_its_d():
    params = make_params([(32, 8), (8,)])
    muon = stochopt.Muon(
        [{"params": params[:1], "use_muon": True}, {"params": params[1:], "use_muon": False}],
        lr=0.02, adjust_lr_fn="match_rms_adamw",
    )  # fmt: skip
    muon.track_statistics()
    set_grads(params, 0)
    muon.step()
    matrix = muon.statistics["params"]["group0.param0"]
    assert matrix["adjusted_lr"] == pytest.approx(adjusted_lr(0.02, "match_rms_adamw", torch.Size([32, 8])))
    assert "adjusted_lr" not in muon.statistics["params"]["group1.param0"]  # AdamW's part has none

    params = make_params([(8, 4)])
    prodigy = stochopt.Prodigy(params, lr=1.0)
    prodigy.track_statistics()
    for t in range(2):
        set_grads(params, t)
        prodigy.step()
    assert prodigy.statistics["groups"][0]["d"] == prodigy.param_groups[0]["d"] > 0


def test_names_off_and_missing_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    opt = stochopt.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert "statistics" not in opt.state[model[0].weight]  # off: nothing kept, nothing computed
    opt.track_statistics()
    opt.step()
    assert set(opt.statistics["params"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    model[1].weight.grad = None
    opt.step()
    assert "1.weight" not in opt.statistics["params"]  # not stepped: no stale numbers
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    opt.track_statistics(False)
    assert opt.statistics == {"params": {}, "groups": []} and "statistics" not in opt.state[model[0].weight]
    with pytest.raises(TypeError, match="enabled"):
        opt.track_statistics("yes")


def test_sparse_gradients_are_refused_by_name():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = stochopt.LazyAdam(embedding.parameters(), lr=1e-2)
    opt.track_statistics()
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="statistics=True does not cover sparse"):
        opt.step()


def test_adapters_give_a_flat_dict_and_tensorboard_scalars():
    params = make_params([(6, 5)])
    opt = stochopt.AdamW(params, lr=1e-2)
    opt.track_statistics()
    set_grads(params, 0)
    opt.step()
    flat = flat_statistics(opt.statistics, prefix="opt")
    assert flat["opt/group0.param0/update_norm"] == opt.statistics["params"]["group0.param0"]["update_norm"]
    assert flat["opt/group0/lr"] == 1e-2

    class Writer:  # the part of torch.utils.tensorboard.SummaryWriter the adapter uses
        def __init__(self) -> None:
            self.scalars: list[tuple[str, float, int]] = []

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            self.scalars.append((tag, value, global_step))

    writer = Writer()
    write_statistics(writer, opt.statistics, step=7, prefix="opt")
    assert writer.scalars == [(tag, value, 7) for tag, value in flat.items()]
    with pytest.raises(TypeError, match="add_scalar"):
        write_statistics(object(), opt.statistics, step=0)


@pytest.mark.parametrize("name", [n for n in stochopt.list_optimizers() if n != "lazyadam"])
def test_every_optimizer_reports_its_update_and_weight(name):
    """Each registered optimizer (LazyAdam's sparse rows aside: refused above), its default path, two steps of a
    small MLP: the update norm is the change of the weights, whatever state the optimizer keeps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = stochopt.create_optimizer(name, list(model.named_parameters()), lr=1e-2)
    opt.track_statistics()
    for _ in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        model(torch.randn(16, 6)).square().mean().backward()
        opt.step()
    stats = opt.statistics["params"]
    assert set(stats) == set(before)
    for n, p in model.named_parameters():
        assert stats[n]["update_norm"] == pytest.approx(norm(p.detach() - before[n]), rel=1e-4, abs=1e-7), n
        assert stats[n]["weight_norm"] == pytest.approx(norm(p), rel=1e-5), n
