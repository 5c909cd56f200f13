"""The digits MLP trained data-parallel (2 gloo processes): top-k at density 0.01 with error feedback ends
within a small margin of uncompressed DDP's loss while sending at least 50x fewer gradient bytes, PowerSGD rank 2
at least 20x fewer; results are written as JSON, CSV and a plot; the CLI runs as one torchrun-style rank."""

from __future__ import annotations

import csv
import json
import math

import pytest

from stochopt.cli import main
from stochopt.distributed import DDPPlan, LaunchConfig, Method, free_port, parse_method, run_ddp, write_results
from tests.distributed.conftest import START

STEPS = 300
MARGIN = 0.05  # final training-set cross-entropy above uncompressed DDP's (which ends near 0.01-0.03)


@pytest.fixture(scope="module")
def results():
    plan = DDPPlan([Method("topk", {"density": 0.01}), Method("powersgd", {"rank": 2})], steps=STEPS, eval_every=STEPS)
    out = run_ddp(plan, LaunchConfig(2, master_port=free_port(), timeout=60), verbose=False, start_method=START)
    return {r.method: r for r in out}


def test_compressed_training_reaches_the_uncompressed_loss_with_fewer_bytes(results):
    dense = results["none"]
    assert dense.bytes_sent == dense.dense_bytes and dense.final_train_loss < 0.1  # it learned
    for name, fewer in (("topk", 50), ("powersgd", 20)):
        r = results[name]
        assert len(r.steps) == STEPS and r.dense_bytes == dense.dense_bytes
        assert r.final_train_loss <= dense.final_train_loss + MARGIN, (name, r.final_train_loss)
        assert r.val_accuracy >= dense.val_accuracy - 0.03, name
        assert r.dense_bytes >= fewer * r.bytes_sent, (name, r.compression)
        assert sum(s["bytes_sent"] for s in r.steps) == r.bytes_sent


def test_fsdp_trains_as_ddp_with_the_state_halved_and_its_bytes_counted():
    """``stochopt ddp --fsdp``: the same model, batches and optimizer sharded by FSDP2 beside DDP (2 processes):
    the same losses (float32: to rounding), half the elementwise optimizer state per rank, and FSDP2's bytes
    (3 (W - 1) / W of the model's bytes per step: two parameter all-gathers and a gradient reduce-scatter)."""
    steps = 20
    plan = DDPPlan([], optimizer="adamw", optimizer_options={"lr": 3e-3}, steps=steps, eval_every=steps, fsdp=True)
    ddp, fsdp = run_ddp(plan, LaunchConfig(2, master_port=free_port(), timeout=60), verbose=False, start_method=START)
    assert (ddp.method, fsdp.method) == ("none", "fsdp")
    assert abs(ddp.final_train_loss - fsdp.final_train_loss) < 1e-5
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(ddp.steps, fsdp.steps))
    assert fsdp.state_bytes * 2 == ddp.state_bytes  # AdamW's moments, sharded (step counters are 0-d)
    assert 2 * fsdp.bytes_sent == 3 * ddp.bytes_sent  # 3 (W-1)/W against all-reduce's 2 (W-1)/W
    with pytest.raises(ValueError, match="fsdp=True compares FSDP2 with uncompressed DDP; compression topk"):
        DDPPlan([Method("topk", {"density": 0.01})], fsdp=True)


def test_results_are_written(results, tmp_path):
    paths = write_results(list(results.values()), tmp_path)
    assert [p.name for p in paths] == ["ddp.json", "ddp_summary.csv", "ddp_steps.csv", "ddp_loss_vs_bytes.png"]
    rows = json.loads(paths[0].read_text())
    assert [r["label"] for r in rows] == ["none", "topk density=0.01", "powersgd rank=2"]
    assert rows[1]["compression"] == pytest.approx(rows[1]["dense_bytes"] / rows[1]["bytes_sent"])
    with paths[2].open() as f:
        steps = list(csv.DictReader(f))
    assert len(steps) == 3 * STEPS and float(steps[-1]["bytes_sent"]) > 0
    assert paths[3].stat().st_size > 10_000


def test_parse_method():
    assert parse_method("topk:density=0.01, momentum=0.9,error_feedback=false") == Method(
        "topk", {"density": 0.01, "momentum": 0.9, "error_feedback": False}
    )
    with pytest.raises(ValueError, match="unknown compression 'zip'"):
        parse_method("zip")
    with pytest.raises(ValueError, match="option 'density' in 'topk:density' is not key=value"):
        parse_method("topk:density")
    with pytest.raises(ValueError, match="density must be in"):
        DDPPlan([parse_method("topk:density=2")])
    with pytest.raises(ValueError, match="unknown optimizer 'sgdd'"):
        DDPPlan([], optimizer="sgdd")
    with pytest.raises(ValueError, match="lr"):
        DDPPlan([], optimizer="adam", optimizer_options={"lr": -1.0})
    with pytest.raises(ValueError, match="optimizer_options: .*momentum"):
        DDPPlan([], optimizer="adam", optimizer_options={"momentum": 0.9})


def test_cli_as_one_torchrun_rank(tmp_path, monkeypatch, capsys):
    # torchrun sets these; one rank runs in this process (the spawned path is exercised above), with ZeRO
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(["ddp", "--compression", "topk:density=0.1;sign", "--steps", "4", "--eval-every", "2",
                 "--optimizer", "adamw", "--lr", "1e-3", "--zero", "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "topk density=0.1" in out and "sign" in out and "fewer bytes" in out
    rows = json.loads((tmp_path / "ddp.json").read_text())
    assert [len(r["steps"]) for r in rows] == [4, 4, 4] and all(math.isfinite(r["final_train_loss"]) for r in rows)


def test_cli_bad_input_exits_2(capsys):
    assert main(["ddp", "--compression", "topk:density=3"]) == 2
    assert "density must be in (0, 1], got 3" in capsys.readouterr().err
    assert main(["ddp", "--nproc", "0"]) == 2
    assert "world_size must be a positive int, got 0" in capsys.readouterr().err
    assert main(["ddp", "--master-addr", "no-such-host.invalid"]) == 2
    assert "master_addr 'no-such-host.invalid' is not an address of this machine" in capsys.readouterr().err
    assert main(["ddp", "--master-port", "70000"]) == 2
    assert "master_port must be an int in [1, 65535], got 70000" in capsys.readouterr().err


def test_an_interrupted_cli_run_keeps_finished_methods_and_resumes(tmp_path, monkeypatch, capsys):
    """One torchrun rank in this process: the second method is interrupted, the first survives in
    ddp_partial.json; --resume trains only the second; other settings refuse the saved results."""
    import stochopt.distributed.train as train

    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = ["ddp", "--compression", "topk:density=0.1", "--steps", "3", "--eval-every", "3", "--out", str(tmp_path)]
    real, trained = train.train_method, []

    def interrupted_at_topk(plan, method, progress=None, on_step=None):
        if method.name == "topk":
            raise KeyboardInterrupt
        trained.append(method.label)
        return real(plan, method, progress, on_step)

    monkeypatch.setattr(train, "train_method", interrupted_at_topk)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err
    saved = json.loads((tmp_path / "ddp_partial.json").read_text())
    assert [r["label"] for r in saved["results"]] == ["none"] and trained == ["none"]

    def recorded(plan, method, progress=None, on_step=None):
        trained.append(method.label)
        return real(plan, method, progress, on_step)

    monkeypatch.setattr(train, "train_method", recorded)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert main([*args, "--seed", "1", "--resume"]) == 2
    assert "other settings (seed: now 1, then 0)" in capsys.readouterr().err
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert main([*args, "--resume"]) == 0
    assert trained == ["none", "topk density=0.1"]
    rows = json.loads((tmp_path / "ddp.json").read_text())
    assert [r["label"] for r in rows] == ["none", "topk density=0.1"]
    assert rows[0] == {**saved["results"][0], "compression": rows[0]["compression"]}
    assert not (tmp_path / "ddp_partial.json").exists()
