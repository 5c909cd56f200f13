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
    assert ids["norm.weight"] == 4 and ids["head.weight"] == 4 and ids["scale"] == 0


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))


class HFInner(nn.Module):  # the shape of a Hugging Face decoder: model.model.layers.N, then model.lm_head
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(20, 8)
        self.layers = nn.ModuleList(Block() for _ in range(4))
        self.norm = nn.RMSNorm(8)


class HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = HFInner()
        self.lm_head = nn.Linear(8, 20, bias=False)


class TimmStyle(nn.Module):  # timm's ViT: class token and position embedding on the model, blocks.N
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.patch_embed = nn.Conv2d(3, 8, 4, 4)
        self.blocks = nn.Sequential(*(Block() for _ in range(3)))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)


class TorchvisionStyle(nn.Module):  # a ResNet: stem, stages layer1..layerK of blocks, fc
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(), Block())
        self.layer2 = nn.Sequential(Block(), Block())
        self.fc = nn.Linear(8, 10)


@pytest.mark.parametrize(
    "model, expected",
    [
        (HFStyle(), {"model.embed_tokens.weight": 0, "model.layers.0.attn.weight": 1, "model.layers.3.mlp.2.bias": 4,
                     "model.norm.weight": 5, "lm_head.weight": 5}),
        (TimmStyle(), {"cls_token": 0, "patch_embed.weight": 0, "blocks.0.mlp.0.weight": 1, "blocks.2.attn.bias": 3,
                       "norm.bias": 4, "head.weight": 4}),
        (TorchvisionStyle(), {"conv1.weight": 0, "bn1.bias": 0, "layer1.0.attn.weight": 1, "layer1.1.mlp.0.bias": 2,
                              "layer2.0.attn.weight": 3, "layer2.1.mlp.2.weight": 4, "fc.weight": 5}),
    ],
    ids=["hugging-face", "timm", "torchvision"],
)  # fmt: skip
def test_layer_decay_finds_the_blocks_anywhere_in_the_tree(model, expected):
    ids = layer_ids(model)
    assert {name: ids[name] for name in expected} == expected
    depth = max(expected.values())
    lr_of = {n: g["lr"] for g in param_groups(model, lr=1.0, layer_decay=0.5) for n in g["param_names"]}
    assert {name: lr_of[name] for name in expected} == {name: 0.5 ** (depth - i) for name, i in expected.items()}
    assert len(set(lr_of.values())) == depth + 1  # every block its own learning rate


def test_without_containers_each_top_level_child_is_a_layer():
    model = nn.Module()
    model.a, model.b, model.c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1)
    assert layer_ids(model) == {"a.weight": 1, "a.bias": 1, "b.weight": 2, "b.bias": 2, "c.weight": 3, "c.bias": 3}


def test_layer_wise_lr_decay():
    model = Tiny()
    groups = param_groups(model, weight_decay=0.1, lr=1.0, layer_decay=0.5)
    ids = layer_ids(model)
    lr_of = {name: g["lr"] for g in groups for name in g["param_names"]}
    assert all(lr_of[name] == 0.5 ** (4 - ids[name]) for name in ids)  # embed 0 .. norm and head 4
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


def test_a_tied_weight_is_judged_by_its_first_owner():
    """GPT-2's output head is its token embedding: named_parameters names it after the embedding, and the
    embedding's rule (no decay) applies, not the head's (nn.Linear)."""
    model = nn.Module()
    model.embed, model.hidden, model.head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight
    decay = {n: g.get("weight_decay") for g in param_groups(model, weight_decay=0.1) for n in g["param_names"]}
    assert decay == {"embed.weight": 0.0, "hidden.weight": 0.1, "hidden.bias": 0.0}
