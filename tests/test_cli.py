"""The command line: `stochopt list` and `stochopt speed` (bad inputs of every command: test_cli_bad_inputs.py)."""

from __future__ import annotations

import json

import pytest

import stochopt
from stochopt.cli import main
from stochopt.speed import model_like_shapes


def test_list_names_every_optimizer(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in stochopt.list_optimizers():
        assert name in out


def test_speed_writes_ratios_against_torch(tmp_path, capsys) -> None:
    path = tmp_path / "speed.json"
    code = main(["speed", "--optimizers", "sgd", "--params", "400000", "--steps", "2", "--warmup", "0",
                 "--json", str(path)])  # fmt: skip
    assert code == 0
    data = json.loads(path.read_text())
    rows = {(r["optimizer"], r["library"], r["path"]): r for r in data["results"]}
    # "fused" is stochopt's compiled kernel, "torch-kernel" the torch kernel fused=True picks for SGD on the CPU
    assert {("sgd", "stochopt", p) for p in ("loop", "foreach", "fused", "default", "torch-kernel")} <= set(rows)
    assert {("sgd", "torch", p) for p in ("foreach", "fused", "default")} <= set(rows)
    baseline = rows[("adamw", "torch", "fused")]
    assert baseline["ratio_to_torch_fused_adamw"] == 1.0
    assert rows[("sgd", "stochopt", "fused")]["recompiles"] == 0
    assert rows[("sgd", "stochopt", "torch-kernel")]["recompiles"] == 0
    assert all(r["params_per_s"] > 0 for r in data["results"])
    assert "vs torch" in capsys.readouterr().out


def test_speed_rejects_unknown_optimizer(capsys) -> None:
    assert main(["speed", "--optimizers", "nope", "--params", "1000"]) == 2
    assert "unknown optimizer 'nope'" in capsys.readouterr().err


def test_model_like_shapes_scale() -> None:
    shapes = model_like_shapes(30_000_000)
    total = sum(a * (b[0] if b else 1) for a, *b in shapes)
    assert 45 <= len(shapes) <= 55 and abs(total - 30_000_000) / 30_000_000 < 0.05
    assert any(len(s) == 1 for s in shapes) and max(a for a, *_ in shapes) >= 10_000


def test_speed_matrix_times_shampoo_and_muon_beside_adam_and_torch_muon(tmp_path, capsys) -> None:
    path = tmp_path / "matrix.json"
    assert main(["speed", "--matrix", "--params", "20000", "--steps", "10", "--json", str(path)]) == 0
    rows = {(r["optimizer"], r["library"]): r for r in json.loads(path.read_text())["results"]}
    assert set(rows) == {("adamw", "torch"), ("adam", "stochopt"), ("muon", "torch"), ("muon", "stochopt"),
                         ("muon", "stochopt-bf16"), ("shampoo", "stochopt")}  # fmt: skip
    assert rows[("adamw", "torch")]["ratio_to_torch_fused_adamw"] == 1.0
    assert all(r["step_ms"] > 0 for r in rows.values())
    assert "recomputes its roots every 10 steps" in capsys.readouterr().out


def test_help_still_exits_0_and_a_bad_input_returns_2(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["speed", "--help"])
    assert done.value.code == 0 and "--params" in capsys.readouterr().out
    assert main(["speed", "--params", "0"]) == 2
    assert capsys.readouterr().err == "stochopt: error: --params must be an integer >= 1000, got '0'\n"
