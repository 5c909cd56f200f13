"""The estimator against measured tensors (every registered optimizer, torch.optim's table, a real module),
the seeds' GPT-2 figures, the ZeRO paper's worked example, and the activation formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stochopt
from stochopt.cli import main
from stochopt.memory import GPT2, TORCH_LAYOUTS, Transformer, estimate, measure_activations
from tests.test_contract import CONTRACT_HP


class Net(nn.Module):
    """Matrices, a conv kernel, vectors, an embedding and a scalar: every shape rule of the layouts."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.conv = nn.Conv1d(12, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(h)).mean() * self.gain


def measured_state_bytes(opt: torch.optim.Optimizer, model: nn.Module) -> int:
    model(torch.arange(20).view(2, 10)).backward()
    opt.step()
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("name", stochopt.list_optimizers())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_registered_optimizer_state_is_exact(name, dtype):
    torch.manual_seed(0)
    model = Net().to(dtype)
    hp = CONTRACT_HP[name]
    est = estimate(name, module=model, precision="fp32" if dtype == torch.float32 else "bf16", hyperparameters=hp)
    # optimizers that build their groups from the model (AdaFisher's layer hooks, Muon's rule) get it, as the
    # estimator does; the others its params
    reads_model = hasattr(stochopt.optimizer_entry(name).cls, "params_from_module")
    opt = stochopt.create_optimizer(name, model if reads_model else model.parameters(), **hp)
    assert est.optimizer_state == measured_state_bytes(opt, model)
    assert est.params == sum(p.nbytes for p in model.parameters()) == est.grads
    assert est.grads == sum(p.grad.nbytes for p in model.parameters())
    assert est.num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adafisher_with_its_model_is_exact(dtype):
    """AdaFisher(model) keeps factor diagonals for Linear/Conv2d layers and Adam's moments for the rest."""
    torch.manual_seed(0)
    model = Net().to(dtype)
    est = estimate("adafisher", module=model, precision="fp32" if dtype == torch.float32 else "bf16")
    opt = stochopt.AdaFisher(model)
    assert opt.param_groups[0]["kronecker"] and len(opt.param_groups[0]["params"]) == 2  # the head's W and b
    assert est.optimizer_state == measured_state_bytes(opt, model)
    precision = "fp32" if dtype == torch.float32 else "bf16"
    assert est.optimizer_state < estimate("adam", module=model, precision=precision).optimizer_state  # factors


TORCH_CASES = [
    ("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", {}), ("Adam", dict(amsgrad=True)),
    ("AdamW", {}), ("Adagrad", {}), ("RMSprop", {}), ("RMSprop", dict(momentum=0.9, centered=True)),
    ("Adadelta", {}), ("NAdam", {}), ("RAdam", {}), ("Adamax", {}), ("Adafactor", {}),
]  # fmt: skip


@pytest.mark.parametrize("name, hp", TORCH_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TORCH_CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_optim_table_is_exact(name, hp, dtype):
    torch.manual_seed(0)
    model = Net().to(dtype)
    est = estimate(f"torch.optim.{name}", module=model, precision="fp32" if dtype == torch.float32 else "bf16",
                   hyperparameters=hp)  # fmt: skip
    assert est.optimizer_state == measured_state_bytes(getattr(torch.optim, name)(model.parameters(), **hp), model)


def test_torch_muon_table_is_exact():
    model = nn.Linear(16, 8, bias=False)
    est = estimate("torch.optim.Muon", module=model, precision="fp32")
    opt = torch.optim.Muon(model.parameters())
    model(torch.ones(4, 16)).sum().backward()
    opt.step()
    assert est.optimizer_state == sum(t.nbytes for s in opt.state.values() for t in s.values())
    assert set(TORCH_LAYOUTS) >= {name for name, _ in TORCH_CASES}


def test_module_by_import_path_and_mixed_precision_masters():
    est = estimate("adamw", module="tests.memory.test_estimate:Net", precision="mixed")
    n = sum(p.numel() for p in Net().parameters())
    assert (est.params, est.grads, est.master_weights) == (2 * n, 2 * n, 4 * n)
    assert est.optimizer_state == 8 * n + 4 * 8  # two float32 moments, and a float32 step per tensor (8 tensors)


def test_seeds_gpt2_figures():
    est = estimate("adam", num_params=1_500_000_000, precision="mixed")
    assert est.params == 3e9  # "3GB for weights in 16-bit precision"
    # "16 Psi bytes ... for GPT-2 with 1.5B parameters, this equals 24GB" (+ Adam's 4-byte step counter)
    assert est.model_states == 24e9 + 4
    xl = estimate("adam", transformer=GPT2["gpt2-xl"])
    assert xl.num_params == 1_557_611_200  # GPT-2 XL's published count, tied output embedding
    assert 16.0 <= xl.model_states / xl.num_params < 16.001
    # the seeds' fused fp32 all-reduce buffer of a 1.5B model: 6 GB
    assert estimate("adam", num_params=1_500_000_000, devices=2).buffers == 6e9


@pytest.mark.parametrize("stage, expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_worked_example(stage, expected_gb):
    # Rajbhandari et al. (2019), Figure 1: Psi = 7.5B, N_d = 64, K = 12 (mixed-precision Adam)
    est = estimate("adam", num_params=7_500_000_000, devices=64, zero_stage=stage)
    assert round(est.model_states / 1e9, 1) == expected_gb


def test_transformer_activations_follow_korthikanti():
    t = Transformer(layers=4, hidden=64, heads=4, seq_len=32, vocab=100, micro_batch=2)
    s, b, h, a, v, L = 32, 2, 64, 4, 100, 4
    outside = s * b * h + 4 * s * b * h * (1 + v / h)
    assert t.activation_bytes("none") == L * s * b * h * (34 + 5 * a * s / h) + outside
    assert t.activation_bytes("selective") == L * 34 * s * b * h + outside == t.activation_bytes("none", True)
    assert t.activation_bytes("full") == L * 2 * s * b * h + outside
    assert estimate("adam", transformer=t, checkpointing="full").activations == t.activation_bytes("full")


def test_module_activations_are_measured_once_per_storage():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    # Linear 1 saves its input (4x10); ReLU saves its output (4x20), which Linear 2 saves as its input too
    assert measure_activations(model, torch.randn(4, 10)) == (40 + 80) * 4
    est = estimate("sgd", module=model, example_input=torch.randn(4, 10), precision="fp32")
    assert est.activations == 480


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(), ValueError, "exactly one of"),
        (dict(num_params=10, precision="fp8"), ValueError, "precision"),
        (dict(num_params=10, zero_stage=4), ValueError, "zero_stage"),
        (dict(num_params=10, devices=0), ValueError, "devices"),
        (dict(module="nope.nothing:Net"), ValueError, "cannot import"),
        (dict(module="no_colon"), ValueError, "package.module:Name"),
        (dict(num_params=10, optimizer="torch.optim.LBFGS"), ValueError, "not in the table"),
        (dict(num_params=10, optimizer="adamx"), ValueError, "unknown optimizer"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        estimate(**{"optimizer": "adam", **kwargs})


def test_cli_compares_optimizers_and_plots(tmp_path, capsys):
    png = tmp_path / "memory.png"
    code = main(["memory", "--transformer", "gpt2", "--optimizer", "adam,adafactor,lion,torch.optim.Adam",
                 "--devices", "8", "--zero", "2", "--png", str(png)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "adafactor" in out and "torch.optim.Adam" in out and "ZeRO stage 2" in out
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert main(["memory", "--params", "1.5e9"]) == 0
    assert "24.000 GB" in capsys.readouterr().out
    assert main(["memory", "--module", "tests.memory.test_estimate:Net", "--optimizer", "nope"]) == 2


class WideNet(nn.Module):
    """Tensors of more and fewer than 4096 values: 8-bit moments for the first, float32 for the others."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 20)  # 6000 values: three blocks of 2048, the last partial
        self.head = nn.Linear(20, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids)).mean()


@pytest.mark.parametrize("name", ["adam", "lion", "sgd", "adagrad", "rmsprop", "ademamix"])
@pytest.mark.parametrize(
    "dtype, storage",
    [
        (torch.float32, {"state_dtype": "int8"}),
        (torch.bfloat16, {"state_dtype": "int8", "weight_rounding": "stochastic"}),
        (torch.bfloat16, {"state_dtype": "int8", "weight_rounding": "compensated"}),
        (torch.bfloat16, {"weight_rounding": "compensated"}),
    ],
    ids=["int8", "int8-sr", "int8-kahan", "kahan"],
)
def test_lean_storage_is_exact(name, dtype, storage):
    torch.manual_seed(0)
    model = WideNet().to(dtype)
    hp = {**CONTRACT_HP[name], **storage}
    if name in ("sgd", "rmsprop"):
        hp["momentum"] = 0.9
    precision = "fp32" if dtype == torch.float32 else "bf16"
    est = estimate(name, module=model, precision=precision, hyperparameters=hp)
    opt = stochopt.create_optimizer(name, model.parameters(), **hp)
    model(torch.arange(20).view(2, 10)).backward()
    opt.step()
    assert est.optimizer_state == sum(t.nbytes for s in opt.state.values() for t in s.values())
    codes = {name for name, t in opt.state[model.embed.weight].items() if t.dtype == torch.uint8}
    assert bool(codes) == ("state_dtype" in storage)  # 8-bit moments for the large tensor only
    assert not any(t.dtype == torch.uint8 for t in opt.state[model.head.weight].values())


def test_the_lean_table_for_gpt2(capsys):
    """Bytes of model states a parameter, GPT-2 small: 16 for float32 and for mixed-precision Adam, about 10
    with 8-bit moments and masters, about 6 with bfloat16 weights and stochastic rounding (2 + 2 + 2), 8 with a
    compensation buffer; in backward the gradients held are the largest parameter's (the embedding)."""
    from stochopt.memory import lean_options

    rows = {e.optimizer: e for e in lean_options(transformer=GPT2["gpt2"])}
    per_param = {label: e.model_states / e.num_params for label, e in rows.items()}
    assert per_param["fp32 Adam"] == per_param["mixed Adam"] == pytest.approx(16, abs=1e-4)  # + step counters
    assert 10 < per_param["mixed 8-bit Adam"] < 10.02
    assert 6 < per_param["bf16+SR 8-bit Adam"] < 6.02
    assert 8 < per_param["bf16+Kahan 8-bit"] < 8.02
    assert rows["bf16+SR 8-bit, in bwd"].grads == 50257 * 768 * 2
    assert main(["memory", "--lean", "--transformer", "gpt2"]) == 0
    assert "bf16+SR 8-bit Adam" in capsys.readouterr().out
