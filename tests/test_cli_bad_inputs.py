"""Every bad input on the command line is one line, ``stochopt: error: ...``, exit status 2, and no traceback,
before any work starts; and the library checks behind it: workload options against the constructor's annotations,
search-space values when the file is loaded."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Literal

import pytest

from stochopt.bench.algorithms import load_algorithm
from stochopt.bench.workloads import load_workload, workload_options
from stochopt.bench.workloads.convex import LeastSquares
from stochopt.cli import build_parser, main

BAD_SPACE = 'optimizer = "adamw"\n[schedule]\nfinal_lr_ratio = 2\n'
LS = ("--workloads", "least_squares")


def case(*argv: str, says: str):
    """One bad command line and a part of the message it must give (it names the argument or the value)."""
    return pytest.param(list(argv), says, id=" ".join(argv) or "(nothing)")


# {tmp} is the test's tmp_path, holding: file.txt (a file), bad_space.toml (BAD_SPACE), not_json.json,
# ddp_out/ddp_partial.json (not a partial-results file); nothing else exists there.
CASES = [
    case(says="the following arguments are required: command"),
    case("nope", says="invalid choice: 'nope'"),
    case("list", "--bogus", says="unrecognized arguments: --bogus"),
    case("list", "extra", says="unrecognized arguments: extra"),
    # speed
    case("speed", "--params", "0", says="--params must be an integer >= 1000, got '0'"),
    case("speed", "--params", "3e6x", says="--params must be an integer >= 1000, got '3e6x'"),
    case("speed", "--steps", "-1", says="--steps must be a positive integer, got '-1'"),
    case("speed", "--warmup", "x", says="--warmup must be a non-negative integer, got 'x'"),
    case("speed", "--optimizers", "nope", "--params", "1000", says="unknown optimizer 'nope'"),
    case("speed", "--optimizers", ",", says="--optimizers names nothing, got ','"),
    case("speed", "--matrix", "--optimizers", "adam", says="--optimizers does not apply to --matrix"),
    case("speed", "--json", "{tmp}/no/such/x.json", says="--json must be in a folder that exists"),
    # schedule
    case("schedule", says="the following arguments are required: names"),
    case("schedule", "nope", says="unknown schedule 'nope'"),
    case("schedule", "cosine", "--steps", "0", says="--steps must be a positive integer, got '0'"),
    case("schedule", "cosine", "--warmup", "1000", says="--warmup (1000) must be below --steps (1000)"),
    case("schedule", "cosine", "--lr", "nan", says="--lr must be a positive number, got 'nan'"),
    case("schedule", "cosine", "--final-lr-ratio", "1.5", says="--final-lr-ratio must be a number in [0, 1]"),
    case("schedule", "inverse-sqrt", "--timescale", "0", says="--timescale must be a positive number, got '0'"),
    case("schedule", "wsd", "--warmup", "500", "--decay-steps", "600", says="decay_steps (500 + 600) must not"),
    case("schedule", "cosine", "--png", "{tmp}/file.txt/x.png", says="--png must be in a folder that exists"),
    # memory
    case("memory", "--params", "0", says="--params must be a positive integer, got '0'"),
    case("memory", "--params", "lots", says="--params must be a positive integer, got 'lots'"),
    case("memory", "--transformer", "12,768", says="LAYERS,HIDDEN,HEADS (three positive integers), got '12,768'"),
    case("memory", "--transformer", "12,768,7", says="hidden (768) must be a multiple of heads (7)"),
    case("memory", "--devices", "0", says="--devices must be a positive integer, got '0'"),
    case("memory", "--zero", "4", says="--zero must be an integer in [0, 3], got '4'"),
    case("memory", "--seq-len", "-8", says="--seq-len must be a positive integer, got '-8'"),
    case("memory", "--bucket-mb", "0", says="--bucket-mb must be a positive number, got '0'"),
    case("memory", "--input-shape", "8,3", says="--input-shape needs --module"),
    case("memory", "--module", "m:Net", "--input-shape", "8,x", says="--input-shape must be comma-separated"),
    case("memory", "--module", "no_such_pkg_xyz:Net", says="cannot import 'no_such_pkg_xyz:Net'"),
    case("memory", "--optimizer", "nope", says="unknown optimizer 'nope'"),
    case("memory", "--precision", "fp8", says="argument --precision: invalid choice: 'fp8'"),
    # viz
    case("viz", "--steps", "-1", says="--steps must be a positive integer, got '-1'"),
    case("viz", "--steps", "0", says="--steps must be a positive integer, got '0'"),
    case("viz", "--function", "sphere", says="unknown function 'sphere'"),
    case("viz", "--optimizers", "nope:lr=1", says="unknown optimizer 'nope'"),
    case("viz", "--optimizers", "sgd:lr=abc", says="the value of lr ('abc') is not a number"),
    case("viz", "--optimizers", "sgd:lr=-1", says="lr must be a finite number >= 0, got -1"),
    case("viz", "--optimizers", ";", says="--optimizers names no optimizer"),
    case("viz", "--start", "1", says="--start must be x,y (two finite numbers), got '1'"),
    case("viz", "--start", "1,inf", says="--start must be x,y (two finite numbers), got '1,inf'"),
    case("viz", "--png", "{tmp}", says="--png must be a file to write"),
    case("viz", "wrong", says="argument figure: invalid choice: 'wrong'"),
    # bench (every case has --storage in tmp: nothing may reach the default file)
    case("bench", "--trials", "0", says="--trials must be a positive integer, got '0'"),
    case("bench", "--trials", "two", says="--trials must be a positive integer, got 'two'"),
    case("bench", "--studies", "-1", says="--studies must be a positive integer, got '-1'"),
    case("bench", "--jobs", "0", says="--jobs must be a positive integer, got '0'"),
    case("bench", "--seed", "-1", says="--seed must be a non-negative integer, got '-1'"),
    case("bench", "--ruleset", "fast", says="argument --ruleset: invalid choice: 'fast'"),
    case("bench", "--workloads", "nope", says="unknown workload 'nope'"),
    case("bench", *LS, "--option", "n=abc", says="option n of workload 'least_squares' must be an int, got 'abc'"),
    case("bench", *LS, "--option", "bogus=1", says="workload 'least_squares' does not take the options ['bogus']"),
    case("bench", *LS, "--option", "n=8", says="workload 'least_squares': n must be"),
    case("bench", "--option", "n", says="--option must be KEY=VALUE, got 'n'"),
    case("bench", "--algorithms", "adamz", says="unknown optimizer 'adamz'"),
    case("bench", "--algorithms", "{tmp}/missing.toml", says="missing.toml' does not exist"),
    case("bench", "--algorithms", "{tmp}/bad_space.toml", says="[schedule] final_lr_ratio must be a number in [0, 1]"),
    case("bench", "--out", "{tmp}/file.txt", says="--out must be a folder to write into"),
    case("bench", "--targets", "{tmp}/targets.json", says="--targets does not apply to bench run"),
    case("bench", "calibrate", "--algorithms", "adamw", says="--algorithms does not apply to bench calibrate"),
    case("bench", "calibrate", *LS, "--targets", "{tmp}/not_json.json", says="not_json.json' is not a targets file"),
    # report
    case("report", "--storage", "{tmp}/missing.db", says="no finished 'external' trials in"),
    case("report", "--ruleset", "calibrate", says="argument --ruleset: invalid choice: 'calibrate'"),
    case("report", "--out", "{tmp}/file.txt", says="--out must be a folder to write into"),
    # ddp (nothing here may get as far as spawning a process)
    case("ddp", "--nproc", "0", says="world_size must be a positive int, got 0"),
    case("ddp", "--nproc", "x", says="--nproc must be an integer, got 'x'"),
    case("ddp", "--steps", "0", says="--steps must be a positive integer, got '0'"),
    case("ddp", "--batch-size", "0", says="--batch-size must be a positive integer, got '0'"),
    case("ddp", "--hidden", "-1", says="--hidden must be a positive integer, got '-1'"),
    case("ddp", "--eval-every", "0", says="--eval-every must be a positive integer, got '0'"),
    case("ddp", "--lr", "0", says="--lr must be a positive number, got '0'"),
    case("ddp", "--timeout", "-1", says="--timeout must be a positive number, got '-1'"),
    case("ddp", "--seed", "-1", says="--seed must be a non-negative integer, got '-1'"),
    case("ddp", "--master-port", "0", says="master_port must be an int in [1, 65535], got 0"),
    case("ddp", "--compression", "nope", says="unknown compression 'nope'"),
    case("ddp", "--compression", "topk:density=3", says="density must be in (0, 1], got 3"),
    case("ddp", "--optimizer", "nope", says="unknown optimizer 'nope'"),
    case("ddp", "--fsdp", "--zero", says="fsdp=True compares FSDP2 with uncompressed DDP; zero=True applies"),
    case("ddp", "--optimizer-options", "momentum", says="option 'momentum' in '--optimizer-options' is not key=value"),
    case("ddp", "--out", "{tmp}/file.txt", says="--out must be a folder to write into"),
    case("ddp", "--out", "{tmp}/ddp_out", "--resume", says="ddp_partial.json is not a partial-results file"),
]


@pytest.fixture
def tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "file.txt").write_text("a file\n")
    (tmp_path / "bad_space.toml").write_text(BAD_SPACE)
    (tmp_path / "not_json.json").write_text("{not json")
    (tmp_path / "ddp_out").mkdir()
    (tmp_path / "ddp_out" / "ddp_partial.json").write_text("[]")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # a torchrun environment around the tests would change ddp's path
    monkeypatch.chdir(tmp_path)  # a default output (stochopt-bench.db, viz.png) would land here, not in the repo
    return tmp_path


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own exits (there should be none but --help's)
        return exit.code if isinstance(exit.code, int) else 1


@pytest.mark.parametrize(("argv", "says"), CASES)
def test_a_bad_input_is_one_line_exit_2_and_no_traceback(argv, says, tmp, capsys):
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    argv += ["--storage", str(tmp / "b.db")] if argv[:1] == ["bench"] else []
    code = run(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[-1].startswith("stochopt: error: ") and says in lines[-1], lines[-1]
    assert not (tmp / "b.db").exists(), "a bad input must fail before the storage is touched"


def test_the_table_has_cases_for_every_subcommand():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    covered = Counter(p.values[0][0] for p in CASES if p.values[0])
    for name, subparser in commands.choices.items():
        takes_arguments = any(not isinstance(a, argparse._HelpAction) for a in subparser._actions)
        assert covered[name] >= (2 if takes_arguments else 1), f"add bad inputs of `stochopt {name}` to CASES"


def test_no_traceback_reaches_the_terminal():
    done = subprocess.run([sys.executable, "-m", "stochopt.cli", "viz", "--steps", "-1"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "stochopt: error: --steps must be a positive integer, got '-1'\n" and not done.stdout


def test_an_error_once_the_work_runs_keeps_its_traceback(tmp, monkeypatch):
    import stochopt.bench.suite as suite

    def planned_then_broken(*args, **kwargs):
        args[8].plan(1, 0)  # progress: the runner has planned its trials
        raise ValueError("a bug in the runner")

    monkeypatch.setattr(suite, "run_benchmark", planned_then_broken)
    argv = ["bench", "--workloads", "least_squares", "--algorithms", "adamw", "--storage", str(tmp / "b.db")]
    with pytest.raises(ValueError, match="a bug in the runner"):
        main(argv)

    def refused_before_planning(*args, **kwargs):  # a study stored with another definition, say
        raise ValueError("the storage already holds study 'x' defined differently")

    monkeypatch.setattr(suite, "run_benchmark", refused_before_planning)
    assert main(argv) == 2

    import stochopt.viz as viz

    def broken_plot(*args, **kwargs):
        raise TypeError("a bug in the plot")

    monkeypatch.setattr(viz, "plot_paths", broken_plot)
    with pytest.raises(TypeError, match="a bug in the plot"):
        main(["viz", "--steps", "2", "--png", str(tmp / "v.png")])


def test_numbers_are_read_as_people_write_them():
    args = build_parser().parse_args(["speed", "--params", "3e6", "--steps", "1_000"])
    assert args.params == 3_000_000 and args.steps == 1000
    assert build_parser().parse_args(["memory"]).params == 1_500_000_000  # the string default, converted


# -- workload options: converted and checked against the constructor's annotations (the Python API too) --------


def test_workload_options_from_text_are_converted_to_the_annotated_types():
    workload = load_workload("least_squares", n="200", dim="1e1", condition="1e3", noise="0")
    assert (workload.n, workload.dim, workload.condition, workload.noise) == (200, 10, 1000.0, 0.0)
    assert type(workload.n) is int and type(workload.condition) is float
    digits = load_workload("digits_mlp", target="0.05")  # float | None
    assert digits.target == 0.05 and load_workload("digits_mlp", target="none").target == load_workload(
        "digits_mlp"
    ).target  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n": "abc"}, "option n of workload 'least_squares' must be an int, got 'abc'"),
        ({"n": "2.5"}, "option n of workload 'least_squares' must be an int, got '2.5'"),
        ({"n": 3.5}, "option n of workload 'least_squares' must be an int, got 3.5"),
        ({"n": True}, "option n of workload 'least_squares' must be an int, got True"),
        ({"condition": "big"}, "option condition of workload 'least_squares' must be a float, got 'big'"),
        ({"condition": None}, "option condition of workload 'least_squares' must be a float, got None"),
        ({"bogus": "1"}, r"does not take the options ['bogus']; its options: n, dim, condition, noise"),
        ({"n": "8"}, "workload 'least_squares': n must be at least dim=32"),  # the constructor's own check, named
    ],
)
def test_a_bad_workload_option_names_the_option_the_workload_and_the_value(options, message):
    with pytest.raises(ValueError) as err:
        load_workload("least_squares", **options)
    assert message in str(err.value)


class _Options(LeastSquares):
    name = "options_probe"

    def __init__(
        self, flag: bool = False, mode: Literal["a", "b"] = "a", root: Path | None = None, scale=1.0, items: list[int]
        | None = None, cap: int | str = 3,
    ) -> None:  # fmt: skip
        super().__init__(n=8, dim=2)
        self.flag, self.mode, self.root, self.scale, self.items, self.cap = flag, mode, root, scale, items, cap


def test_bool_literal_path_union_and_unannotated_options():
    got = workload_options(_Options, {"flag": "yes", "mode": "b", "root": "/data", "scale": "2", "items": "[1]",
                                      "cap": "7"})  # fmt: skip
    assert got == {"flag": True, "mode": "b", "root": Path("/data"), "scale": 2.0, "items": "[1]", "cap": 7}
    assert workload_options(_Options, {"flag": "0", "root": "None", "cap": "all"}) == {
        "flag": False, "root": None, "cap": "all"
    }  # fmt: skip
    for options, message in [
        ({"flag": "maybe"}, "option flag of workload 'options_probe' must be a bool (true or false), got 'maybe'"),
        ({"flag": 1}, "must be a bool (true or false), got 1"),
        ({"mode": "c"}, "option mode of workload 'options_probe' must be one of 'a', 'b', got 'c'"),
        ({"root": 3}, "option root of workload 'options_probe' must be a Path or None, got 3"),
        ({"scale": "x"}, "option scale of workload 'options_probe' must be a float, got 'x'"),  # from the default
    ]:
        with pytest.raises(ValueError) as err:
            workload_options(_Options, options)
        assert message in str(err.value)


# -- search-space files: every value checked when the file is loaded, the message naming file, key and value ----

GOOD = """optimizer = "adamw"
[schedule]
final_lr_ratio = 0.1
[defaults]
lr = 1e-3
one_minus_beta1 = 0.1
warmup_fraction = 0.05
batch_size = 16
[search]
lr = { low = 1e-4, high = 1e-2, log = true }
one_minus_beta1 = { low = 0.01, high = 0.5, log = true }
batch_size = { low = 8, high = 64, log = true, integer = true }
warmup_fraction = { low = 0.0, high = 0.2 }
"""


def test_a_good_space_with_an_integer_range_loads(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    algorithm = load_algorithm(str(path))
    assert algorithm.search["batch_size"].integer and algorithm.final_lr_ratio == 0.1


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("final_lr_ratio = 0.1", "final_lr_ratio = 1.5", "[schedule] final_lr_ratio must be a number in [0, 1]"),
        ("final_lr_ratio = 0.1", 'final_lr_ratio = "0"', "final_lr_ratio must be a number in [0, 1], got '0'"),
        ("low = 1e-4", 'low = "1e-4"', "[search] lr: low and high must be numbers, got '1e-4', 0.01"),
        ("low = 1e-4", "low = true", "[search] lr: low and high must be numbers, got True"),
        ("low = 1e-4", "low = -inf", "[search] lr: low and high must be finite, got -inf"),
        ("high = 1e-2", "high = 1e-5", "[search] lr: low (0.0001) must be below high (1e-05)"),
        ("low = 1e-4, high = 1e-2, log = true", "low = 0, high = 1e-2, log = true", "a log range needs low > 0, got 0"),
        ("high = 1e-2, log = true", 'high = 1e-2, log = "yes"', "[search] lr: log must be true or false, got 'yes'"),
        ("low = 8,", "low = 8.5,", "[search] batch_size: an integer range needs integer bounds, got low = 8.5"),
        (", integer = true", "", "[search] batch_size must be an integer range (integer = true)"),
        ("batch_size = 16", "batch_size = 16.5", "[defaults] batch_size must be an integer (its [search] range is"),
        ("high = 0.2", "high = 2", "[search] warmup_fraction: high must be in [0, 1], got 2.0"),
        ("warmup_fraction = 0.05", "warmup_fraction = 1.5", "[defaults] warmup_fraction must be in [0, 1], got 1.5"),
        ("warmup_fraction = 0.05", "clip_norm = 0\nwarmup_fraction = 0.05", "[defaults] clip_norm must be > 0, got 0"),
        ("lr = 1e-3", 'lr = "1e-3"', "[defaults] lr must be a number, got '1e-3'"),
        ("one_minus_beta1 = 0.1\n", 'one_minus_beta1 = "x"\n', "[defaults] one_minus_beta1 must be a number, got 'x'"),
        ("lr = 1e-3", "lr = -1.0", "AdamW refuses [defaults]: lr must be"),
        ("high = 0.5", "high = 1.5", "AdamW refuses [search] one_minus_beta1 = 1.5 (the high end of its range)"),
        ('optimizer = "adamw"', 'optimizer = "adamw"\nsparse_gradients = "yes"', "sparse_gradients must be true or"),
        ('optimizer = "adamw"', 'optimizer = "adamw"\ndescription = 3', "description must be a string, got 3"),
        ('optimizer = "adamw"', 'optimizer = "adamw"\ntuning = 1', "unknown keys ['tuning']"),
    ],
)
def test_a_bad_search_space_value_is_refused_when_loaded(old, new, message, tmp_path):
    assert old in GOOD
    path = tmp_path / "space.toml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ValueError) as err:
        load_algorithm(str(path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_json_search_space_is_checked_alike(tmp_path):
    path = tmp_path / "space.json"
    path.write_text('{"optimizer": "sgd", "defaults": {"lr": 0.1}, "schedule": {"final_lr_ratio": -0.5}}')
    with pytest.raises(ValueError, match=r"space.json: \[schedule\] final_lr_ratio must be a number in \[0, 1\]"):
        load_algorithm(str(path))
