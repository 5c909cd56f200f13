"""Parameter groups: the default no-decay rule, name patterns, layer-wise lr decay, create_optimizer(module)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stochopt
from stochopt.training import layer_ids, param_groups


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)) for _ in range(3)
        )
        self.norm = nn.RMSNorm(8)
        self.head = nn.Linear(8, 5, bias=False)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h)) * self.scale


def names_by_decay(groups):
    return {g.get("weight_decay"): sorted(g["param_names"]) for g in groups}


def test_default_exempts_biases_norms_and_embeddings():
    model = Tiny()
    groups = param_groups(model, weight_decay=0.1)
    decayed = sorted(f"blocks.{i}.{j}.weight" for i in range(3) for j in (1, 3)) + ["head.weight"]
    everything = sorted(name for name, _ in model.named_parameters())
    assert names_by_decay(groups) == {0.1: decayed, 0.0: sorted(set(everything) - set(decayed))}
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len(everything) and len({id(p) for p in params}) == len(params)


def test_without_weight_decay_the_optimizer_default_applies():
    groups = param_groups(Tiny())
    opt = stochopt.AdamW(groups, lr=1e-3, weight_decay=0.3)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.3]


def test_patterns_replace_the_rule():
    groups = param_groups(Tiny(), weight_decay=0.1, no_decay=["*.bias", "embed.*"])
    exempt = names_by_decay(groups)[0.0]
    assert "embed.weight" in exempt and "blocks.0.1.bias" in exempt
    assert "blocks.0.0.weight" not in exempt  # a LayerNorm weight: decayed, since the patterns replace the rule
    with pytest.raises(TypeError, match="no_decay"):
        param_groups(Tiny(), no_decay="*.bias")


def test_callable_rule_sees_the_owning_module():
    seen = []
    param_groups(Tiny(), no_decay=lambda name, p, module: seen.append((name, type(module).__name__)) or False)
    assert ("embed.weight", "Embedding") in seen and ("scale", "Tiny") in seen and ("norm.weight", "RMSNorm") in seen


def test_layer_ids_count_from_the_input():
    ids = layer_ids(Tiny())
    assert ids["embed.weight"] == 0 and ids["blocks.0.1.weight"] == 1 and ids["blocks.2.3.bias"] == 3
    assert ids["norm.weight"] == 4 and ids["head.weight"] == 5 and ids["scale"] == 0


def test_layer_wise_lr_decay():
    model = Tiny()
    groups = param_groups(model, weight_decay=0.1, lr=1.0, layer_decay=0.5)
    ids = layer_ids(model)
    lr_of = {name: g["lr"] for g in groups for name in g["param_names"]}
    assert all(lr_of[name] == 0.5 ** (5 - ids[name]) for name in ids)
    custom = param_groups(model, lr=1.0, layer_decay=0.5, layer_of=lambda name: 1 if name.startswith("head") else 0)
    lr_of = {name: g["lr"] for g in custom for name in g["param_names"]}
    assert lr_of["head.weight"] == 1.0 and lr_of["embed.weight"] == 0.5
    with pytest.raises(ValueError, match="layer_decay needs lr"):
        param_groups(model, layer_decay=0.5)
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(model, lr=1.0, layer_decay=0.0)


def test_groups_train_and_resume_in_a_torch_optimizer():
    model = Tiny()
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1, lr=1e-2, layer_decay=0.8), lr=1e-2)
    model(torch.arange(10)).sum().backward()
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.state_dict()["param_groups"][0]["param_names"]


def test_create_optimizer_accepts_a_module():
    model = Tiny()
    opt = stochopt.create_optimizer("lamb", model, lr=1e-3, weight_decay=0.01)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    without_decay = stochopt.create_optimizer("lazyadam", model, lr=1e-3)  # no weight_decay: one group
    assert len(without_decay.param_groups) == 1
