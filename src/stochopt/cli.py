"""The ``stochopt`` command: thin wrappers that parse, call one library function and print.

Every bad input ends as one line on stderr, ``stochopt: error: ...``, and exit status 2, before any work starts:
argparse types check each argument's type and range (:func:`_integer`, :func:`_number`, the paths), and the
ValueError or TypeError a library function raises on the user's input (an unknown name, a bad option) is turned
into that line where the command calls it (:func:`_user_input`). Anything else, and an error once the work has
started, keeps its traceback: it is a bug, not a typo.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stochopt.extras import MissingExtraError, installed_version, require


class UsageError(Exception):
    """A bad input on the command line: :func:`main` prints it as ``stochopt: error: ...`` and returns 2."""


@contextmanager
def _user_input() -> Iterator[None]:
    """Around a library call driven by the user's input: its ValueError or TypeError is that input's fault, so it
    becomes a :class:`UsageError` with the library's message (anything else is a bug and keeps its traceback)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is a :class:`UsageError` (one line, no usage dump) rather than an exit here."""

    def error(self, message: str):  # type: ignore[override]
        # the types' messages read "must be ...": "argument --steps: must be ..." -> "--steps must be ..."
        raise UsageError(re.sub(r"^argument ([^:]+): (?=must be )", r"\1 ", message))


def _int_text(text: str) -> int | None:
    """``"20"``, ``"30_000_000"`` or an integral ``"3e6"`` as an int; None for anything else."""
    from stochopt.bench.workloads import parse_int

    return parse_int(text)


def _integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (``3e6`` is one), else a message naming the value."""
    if low is not None and high is not None:
        want = f"an integer in [{low}, {high}]"
    else:
        named = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}
        want = named.get(low, f"an integer >= {low}")

    def parse(text: str) -> int:
        value = _int_text(text)
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    return parse


def _number(low: float | None = None, high: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= low (> low with ``above``) and <= high."""
    if low is not None and high is not None:
        want = f"a number in [{low:g}, {high:g}]"
    elif low == 0:
        want = "a positive number" if above else "a non-negative number"
    else:
        want = "a finite number" if low is None else f"a number {'>' if above else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        below = low is not None and (value <= low if above else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    return parse


def _integers(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive integers (a shape)."""
    values = [_int_text(v.strip()) for v in text.split(",")]
    if not values or any(v is None or v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers such as 8,3,32,32, got {text!r}")
    return tuple(values)  # type: ignore[arg-type]


def _point(text: str) -> tuple[float, float]:
    """An argparse type: ``x,y``, two finite numbers."""
    parts = text.split(",")
    try:
        x, y = (float(v) for v in parts)
    except ValueError:
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y)):
        raise argparse.ArgumentTypeError(f"must be x,y (two finite numbers), got {text!r}")
    return x, y


def _transformer(text: str) -> str | tuple[int, int, int]:
    """An argparse type: a GPT-2 name, or LAYERS,HIDDEN,HEADS as three positive integers."""
    from stochopt.memory import GPT2

    if text in GPT2:
        return text
    values = [_int_text(v.strip()) for v in text.split(",")]
    if len(values) != 3 or any(v is None or v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(GPT2)} or LAYERS,HIDDEN,HEADS (three positive integers), got {text!r}"
        )
    return values[0], values[1], values[2]  # type: ignore[return-value]


def _output_file(text: str) -> str:
    """An argparse type: a file to write, in a folder that exists (checked now, not after the work)."""
    path = Path(text)
    if not text or path.is_dir():
        why = " (a folder)" if text else ""
        raise argparse.ArgumentTypeError(f"must be a file to write, got {text!r}{why}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"must be in a folder that exists, got {text!r} ({str(path.parent)!r} is not)")
    return text


def _output_folder(text: str) -> str:
    """An argparse type: a folder to write into (created if missing), not an existing file."""
    if not text or (Path(text).exists() and not Path(text).is_dir()):
        why = " (a file)" if text else ""
        raise argparse.ArgumentTypeError(f"must be a folder to write into, got {text!r}{why}")
    return text


def _names(text: str, flag: str) -> list[str]:
    """The non-empty names of a comma-separated list, or a UsageError when there are none."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"{flag} names nothing, got {text!r}")
    return names


def _list(args: argparse.Namespace) -> int:
    from stochopt.registry import list_optimizers, optimizer_entry

    for name in list_optimizers():
        entry = optimizer_entry(name)
        print(f"{name:<10} {entry.cls.__name__:<10} {entry.summary}  [{entry.reference}]")
    return 0


def _speed(args: argparse.Namespace) -> int:
    from stochopt.registry import optimizer_entry
    from stochopt.speed import as_json, format_table, run_speed

    if args.matrix:
        from stochopt.speed_matrix import format_matrix_table, run_matrix_speed

        if args.optimizers:
            raise UsageError("--optimizers does not apply to --matrix (it times Shampoo and Muon beside Adam)")
        results, total = run_matrix_speed(args.params, args.steps, _given(args.warmup, 2),
                                          progress=lambda m: print(m, file=sys.stderr))  # fmt: skip
        print(format_matrix_table(results, total))
        if args.json:
            Path(args.json).write_text(json.dumps(as_json(results, total), indent=2))
            print(f"wrote {args.json}")
        return 0
    names = _names(args.optimizers, "--optimizers") if args.optimizers is not None else None
    with _user_input():
        for name in names or []:
            optimizer_entry(name)  # an unknown name fails now, not after timing the others
    results, total = run_speed(names, args.params, steps=args.steps, warmup=_given(args.warmup, 7),
                               progress=lambda m: print(m, file=sys.stderr))  # fmt: skip
    print(format_table(results, total))
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(results, total), indent=2))
        print(f"wrote {args.json}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from stochopt.training.schedules import plot_schedules, schedule_curve

    if args.warmup >= args.steps:
        raise UsageError(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    curves = {}
    for name in _names(args.names, "names"):
        with _user_input():
            curves[name] = schedule_curve(
                name, lr=args.lr, total_steps=args.steps, warmup_steps=args.warmup, decay_steps=args.decay_steps,
                final_lr_ratio=args.final_lr_ratio, timescale=args.timescale,
            )  # fmt: skip
    marks = sorted({0, args.warmup, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    print("step    " + "".join(f"{name:>15}" for name in curves))
    for t in marks:
        print(f"{t:<8}" + "".join(f"{lrs[t]:>15.6g}" for lrs in curves.values()))
    if args.png:
        plot_schedules(curves, args.png)
        print(f"wrote {args.png}")
    return 0


def _memory(args: argparse.Namespace) -> int:
    from stochopt.memory import GPT2, Transformer, compare, format_table, lean_options, plot_memory

    if args.input_shape and not args.module:
        raise UsageError("--input-shape needs --module (the shape of that module's example input)")
    source: dict = {}
    with _user_input():
        if args.transformer:
            if isinstance(args.transformer, str):
                spec = GPT2[args.transformer]
                source["transformer"] = Transformer(spec.layers, spec.hidden, spec.heads, args.seq_len, spec.vocab,
                                                    args.micro_batch)  # fmt: skip
            else:
                layers, hidden, heads = args.transformer
                source["transformer"] = Transformer(layers, hidden, heads, args.seq_len, args.vocab, args.micro_batch)
        elif args.module:
            source["module"] = args.module
            if args.input_shape:
                import torch

                source["example_input"] = torch.zeros(args.input_shape)
        else:
            source["num_params"] = args.params
        common = dict(
            devices=args.devices, zero_stage=args.zero, checkpointing=args.checkpointing,
            flash_attention=args.flash_attention,
            bucket_bytes=None if args.bucket_mb is None else max(1, int(args.bucket_mb * 2**20)), **source,
        )  # fmt: skip
        if args.lean:
            estimates = lean_options(**common)
        else:
            estimates = compare(_names(args.optimizer, "--optimizer"), precision=args.precision, **common)
    print(format_table(estimates))
    if args.png:
        plot_memory(estimates, args.png)
        print(f"wrote {args.png}")
    return 0


def _viz(args: argparse.Namespace) -> int:
    from stochopt import viz

    if args.figure == "momentum":
        viz.plot_momentum_memory(args.png)
    elif args.figure == "bias-correction":
        viz.plot_bias_correction(args.png)
    else:
        specs = [spec.strip() for spec in args.optimizers.split(";") if spec.strip()]
        if not specs:
            raise UsageError(f"--optimizers names no optimizer, got {args.optimizers!r}")
        with _user_input():
            function = viz.surface(args.function)
            for spec in specs:  # zero steps: builds each optimizer, so that a bad spec fails before any path runs
                viz.run_path(function, spec, args.start, 0)
        paths = {spec: viz.run_path(function, spec, args.start, args.steps) for spec in specs}
        for label, points in paths.items():
            x, y = points[-1].tolist()
            print(
                f"{label:<40} {len(points) - 1:5d} steps  end ({x:.4g}, {y:.4g})  f = {function(points[-1]).item():.4g}"
            )
        viz.plot_paths(function, paths, args.png, args.loss_png)
        if args.gif:
            viz.animate_paths(function, paths, args.gif)
            print(f"wrote {args.gif}")
    print(f"wrote {args.png}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    require("optuna", "rich", "scipy", "sklearn", feature="stochopt bench")
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from stochopt.bench.algorithms import load_algorithm
    from stochopt.bench.progress import RichProgress
    from stochopt.bench.report import noise_notes, tables, write_report
    from stochopt.bench.storage import open_storage
    from stochopt.bench.suite import DEFAULT_ALGORITHMS, QUICK, load_workloads

    def names(values: list[str] | None, flag: str) -> list[str] | None:
        return [n for v in values for n in _names(v, flag)] if values else None

    options = {}
    for item in args.option or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--option must be KEY=VALUE, got {item!r}")
        options[key.strip()] = value
    calibrating = args.action == "calibrate"
    wrong = ["--algorithms", "--ruleset", "--option", "--quick"] if calibrating else ["--targets"]
    given = {"--algorithms": args.algorithms, "--ruleset": args.ruleset, "--option": args.option,
             "--quick": args.quick, "--targets": args.targets}  # fmt: skip
    if used := [flag for flag in wrong if given[flag]]:
        why = "calibrate tunes the baselines on the workloads as they are" if calibrating else "only calibrate"
        raise UsageError(f"{', '.join(used)} {'does' if len(used) == 1 else 'do'} not apply to bench "
                         f"{args.action} ({why})")  # fmt: skip
    quick = QUICK if args.quick else {}
    if args.quick:
        print(QUICK["why"])
    workloads = names(args.workloads, "--workloads") or quick.get("workloads") or _all_workloads()
    algorithms = [] if calibrating else (names(args.algorithms, "--algorithms") or quick.get("algorithms")
                                         or DEFAULT_ALGORITHMS)  # fmt: skip
    if args.targets and Path(args.targets).is_file():  # read after the calibration: checked before it
        try:
            if not isinstance(json.loads(Path(args.targets).read_text()), dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as err:
            raise UsageError(f"--targets {args.targets!r} is not a targets file (JSON object): {err}") from None
    with _user_input():  # every name, option, search space and the storage, before the first trial
        load_workloads(workloads, options)
        for algorithm in algorithms:
            load_algorithm(algorithm)
        storage = open_storage(args.storage)
    if calibrating:
        from stochopt.bench.calibrate import CalibrationFailed, calibrate

        progress = RichProgress()
        try:
            with progress, _before_trials(progress):
                targets = calibrate(
                    workloads, _given(args.trials, 5), _given(args.studies, 3),
                    args.seed, args.storage, args.jobs, progress, args.targets,
                )  # fmt: skip
        except KeyboardInterrupt:
            print(f"interrupted; finished trials are kept in {args.storage}: rerun to resume", file=sys.stderr)
            return 130
        except CalibrationFailed as err:
            print(f"stochopt: error: {err}", file=sys.stderr)
            return 1
        for name, entry in targets.items():
            print(f"{name:<16} target {entry['target']:.6g}   {entry['source']}")
        return 0

    from stochopt.bench.suite import run_benchmark

    progress = RichProgress()
    try:
        with progress, _before_trials(progress):
            result = run_benchmark(
                workloads, algorithms, args.ruleset or quick.get("ruleset", "external"),
                _given(args.trials, quick.get("trials", 5)), _given(args.studies, quick.get("studies", 1)), storage,
                args.jobs, args.seed, progress, options,
            )  # fmt: skip
    except KeyboardInterrupt:
        print(f"interrupted; finished trials are kept in {args.storage}: rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 130
    header, rows, score_rows = tables(result)
    title = f"time to target ({result.ruleset} ruleset): median [min-max] over studies"
    table = Table(*map(escape, header), title=escape(title))  # the brackets are text, not rich markup
    for row in rows:
        table.add_row(*map(escape, row))
    table.add_section()
    for row in score_rows:
        table.add_row(*map(escape, row))
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # piped: no 80-column wrap
    for note in noise_notes(result):
        print(f"within noise: {note}")
    print(f"wrote {write_report(result, args.out)}")
    return 0


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


@contextmanager
def _before_trials(progress) -> Iterator[None]:
    """A ValueError before the runner plans its trials (a study stored with another definition) is the user's;
    once it has (``progress.plan`` was called), one is a bug and keeps its traceback."""
    try:
        yield
    except ValueError as err:
        if getattr(progress, "overall", None) is not None:
            raise
        raise UsageError(str(err)) from err


def _all_workloads() -> list[str]:
    from stochopt.bench.workloads import WORKLOADS

    return list(WORKLOADS)


def _report(args: argparse.Namespace) -> int:
    require("optuna", "matplotlib", feature="stochopt report", extra="bench")
    from stochopt.bench.report import write_report
    from stochopt.bench.suite import load_result

    if "://" not in args.storage and not Path(args.storage).is_file():  # opening it would create an empty one
        raise UsageError(f"no finished {args.ruleset!r} trials in {args.storage!r}: the file does not exist")
    with _user_input():
        result = load_result(args.storage, args.ruleset)
    print(f"wrote {write_report(result, args.out)}")
    return 0


#: the compressions ``stochopt ddp`` compares with uncompressed DDP when --compression is not given
DEFAULT_COMPRESSION = "topk:density=0.01;randomk:density=0.01;sign;powersgd:rank=2"


def _ddp(args: argparse.Namespace) -> int:
    from stochopt.distributed import DDPPlan, DistributedError, LaunchConfig, free_port, parse_method
    from stochopt.distributed.launch import torchrun_rank
    from stochopt.distributed.train import (
        PARTIAL_FILE,
        format_table,
        load_partial,
        parse_options,
        run_ddp,
        write_results,
    )

    partial = Path(args.out) / PARTIAL_FILE
    compression = args.compression if args.compression is not None else "" if args.fsdp else DEFAULT_COMPRESSION
    with _user_input():  # everything is checked here, before a process starts
        if args.optimizer_options is None:
            options = {"momentum": 0.9} if args.optimizer == "sgd" else {}
        else:
            options = parse_options(args.optimizer_options, "--optimizer-options")
        plan = DDPPlan(
            [parse_method(spec) for spec in compression.split(";") if spec.strip()], optimizer=args.optimizer,
            optimizer_options={"lr": args.lr, **options}, steps=args.steps, batch_size=args.batch_size,
            hidden=args.hidden, seed=args.seed, eval_every=args.eval_every, zero=args.zero, fsdp=args.fsdp,
        )  # fmt: skip
        port = args.master_port if args.master_port is not None else free_port(args.master_addr)
        config = LaunchConfig(args.nproc, args.master_addr, port, args.timeout)
        torchrun_rank(args.timeout)  # a half-set torchrun environment
        if args.resume and partial.is_file():
            try:
                load_partial(partial, plan)  # results trained with other settings
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{partial} is not a partial-results file of stochopt ddp ({type(err).__name__}: "
                                 f"{err}); remove it or drop --resume") from None  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.resume:
        partial.unlink(missing_ok=True)
    try:
        results = run_ddp(plan, config, verbose=not args.quiet, partial=partial, resume=args.resume)
    except (DistributedError, KeyboardInterrupt) as err:
        print(f"stochopt: error: {err or 'interrupted'}", file=sys.stderr)
        if partial.is_file():
            print(f"stochopt: the methods finished are kept in {partial}; run again with --resume to train only "
                  "the others", file=sys.stderr)  # fmt: skip
        return 1
    if results is None:  # not rank 0 of a torchrun launch
        return 0
    print(format_table(results))
    for path in write_results(results, args.out):
        print(f"wrote {path}")
    partial.unlink(missing_ok=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stochopt", description="stochastic optimizers for PyTorch")
    parser.add_argument("--version", action="version", version=f"stochopt {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="every optimizer, with what it is and its reference")
    p_list.set_defaults(func=_list)
    p_speed = sub.add_parser("speed", help="time one optimizer step in every execution path")
    p_speed.add_argument("--optimizers", help="comma-separated names (default: all elementwise optimizers)")
    p_speed.add_argument("--params", type=_integer(1000), default=30_000_000,
                         help="total parameters, at least 1000 (default 30M)")  # fmt: skip
    p_speed.add_argument("--steps", type=_integer(1), default=20, help="timed steps per measurement (default 20)")
    p_speed.add_argument(
        "--warmup",
        type=_integer(0),
        help="untimed steps after the first (default 7, past kernels that switch on later: Ranger syncs every 6; "
        "--matrix: 2)",
    )
    p_speed.add_argument("--json", metavar="PATH", type=_output_file, help="also write the measurements as JSON")
    p_speed.add_argument(
        "--matrix", action="store_true",
        help="amortized step of Shampoo and Muon beside Adam and torch.optim.Muon, on matrices (--params 3e6 is a "
        "good size)",
    )  # fmt: skip
    p_speed.set_defaults(func=_speed)

    from stochopt.training.schedules import SCHEDULES

    p_sched = sub.add_parser("schedule", help="a learning-rate schedule's values, and a plot of it")
    p_sched.add_argument("names", help=f"comma-separated schedules to compare: {', '.join(SCHEDULES)}")
    p_sched.add_argument("--lr", type=_number(0, above=True), default=1e-3, help="peak learning rate (default 1e-3)")
    p_sched.add_argument("--steps", type=_integer(1), default=1000, help="total steps (default 1000)")
    p_sched.add_argument("--warmup", type=_integer(0), default=0, help="linear warmup steps, below --steps (default 0)")
    p_sched.add_argument("--decay-steps", type=_integer(0), help="wsd: length of the final decay (default steps/5)")
    p_sched.add_argument("--final-lr-ratio", type=_number(0, 1), default=0.0,
                         help="floor as a fraction of lr, in [0, 1] (default 0)")  # fmt: skip
    p_sched.add_argument("--timescale", type=_number(0, above=True), help="inverse-sqrt: tau (default: warmup, or 1)")
    p_sched.add_argument("--png", metavar="PATH", type=_output_file, help="write a plot of lr against step")
    p_sched.set_defaults(func=_schedule)

    p_mem = sub.add_parser("memory", help="training memory per device: model states, activations, buffers")
    what = p_mem.add_mutually_exclusive_group()
    what.add_argument("--params", type=_integer(1), default="1.5e9",
                      help="number of parameters (default 1.5e9, the seeds' GPT-2)")  # fmt: skip
    what.add_argument("--transformer", type=_transformer,
                      help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or LAYERS,HIDDEN,HEADS")  # fmt: skip
    what.add_argument("--module", help="an nn.Module by import path, package.module:Name")
    p_mem.add_argument("--input-shape", type=_integers,
                       help="with --module: example input shape, e.g. 8,3,32,32 (activations)")  # fmt: skip
    p_mem.add_argument("--optimizer", default="adam", help="comma-separated: stochopt names or torch.optim.Name")
    p_mem.add_argument("--precision", default="mixed", choices=["fp32", "mixed", "bf16"])
    p_mem.add_argument("--devices", type=_integer(1), default=1)
    p_mem.add_argument("--zero", type=_integer(0, 3), default=0, metavar="{0,1,2,3}", help="ZeRO stage")
    p_mem.add_argument("--seq-len", type=_integer(1), default=1024)
    p_mem.add_argument("--micro-batch", type=_integer(1), default=1)
    p_mem.add_argument("--vocab", type=_integer(1), default=50257)
    p_mem.add_argument("--checkpointing", default="none", choices=["none", "selective", "full"])
    p_mem.add_argument("--flash-attention", action="store_true")
    p_mem.add_argument("--bucket-mb", type=_number(0, above=True),
                       help="all-reduce bucket in MiB (default: one fused fp32 buffer)")  # fmt: skip
    p_mem.add_argument("--lean", action="store_true",
                       help="Adam's memory-lean options side by side: 8-bit state, bf16 weights with "
                            "stochastic rounding or compensation, the step in backward (ignores --optimizer, "
                            "--precision)")  # fmt: skip
    p_mem.add_argument("--png", metavar="PATH", type=_output_file, help="write a stacked bar chart")
    p_mem.set_defaults(func=_memory)

    from stochopt.viz.functions import FUNCTIONS

    p_viz = sub.add_parser("viz", help="optimizer paths on 2-D functions; the seeds' small figures")
    p_viz.add_argument("figure", nargs="?", default="paths", choices=["paths", "momentum", "bias-correction"])
    p_viz.add_argument("--function", default="rosenbrock", help=f"one of {', '.join(FUNCTIONS)}")
    p_viz.add_argument(
        "--optimizers", default="sgd:lr=1e-3;sgd:lr=1e-3,momentum=0.9,nesterov=True;adam:lr=0.05",
        help="';'-separated name:key=value,... (default: GD, Nesterov, Adam)",
    )  # fmt: skip
    p_viz.add_argument("--steps", type=_integer(1), default=300, help="optimizer steps per path (default 300)")
    p_viz.add_argument("--start", type=_point, help="x,y (default: the function's usual start)")
    p_viz.add_argument("--png", default="viz.png", type=_output_file, help="output PNG (default viz.png)")
    p_viz.add_argument("--gif", type=_output_file, help="also an animation")
    p_viz.add_argument("--loss-png", type=_output_file, help="also f - f* against steps")
    p_viz.set_defaults(func=_viz)

    p_bench = sub.add_parser("bench", help="AlgoPerf-style benchmark: time to a validation target, scored by profiles")
    p_bench.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "calibrate"],
        help="run the suite (default), or calibrate: set the workloads' targets from the baselines",
    )
    p_bench.add_argument("--quick", action="store_true", help="a few algorithms on the fast workloads (minutes)")
    p_bench.add_argument("--workloads", nargs="+", help="names or package.module:Class (default: all)")
    p_bench.add_argument("--algorithms", nargs="+",
                         help="shipped search spaces (nadamw, adamw, ...), SPACE.toml, optimizer names or import paths "
                         "(torch.optim.AdamW, package.module:Class)")  # fmt: skip
    p_bench.add_argument("--ruleset", choices=["external", "self"], help="external tuning (default) or self-tuning")
    p_bench.add_argument("--trials", type=_integer(1), help="trials per study (external tuning; default 5)")
    p_bench.add_argument("--studies", type=_integer(1),
                         help="studies per workload and algorithm (default 1; calibrate 3)")  # fmt: skip
    p_bench.add_argument(
        "--storage",
        default="stochopt-bench.db",
        help="SQLite file or SQLAlchemy URL, e.g. postgresql://host/db (default stochopt-bench.db)",
    )
    p_bench.add_argument("--jobs", type=_integer(1), default=1, help="trials run in parallel processes (default 1)")
    p_bench.add_argument("--seed", type=_integer(0), default=0)
    p_bench.add_argument("--option", action="append", metavar="KEY=VALUE", help="workload option, e.g. data_dir=...")
    p_bench.add_argument("--out", default="stochopt-report", type=_output_folder,
                         help="report folder (default stochopt-report)")  # fmt: skip
    p_bench.add_argument("--targets", type=_output_file,
                         help="calibrate: the targets file to update (default: the shipped one)")  # fmt: skip
    p_bench.set_defaults(func=_bench)

    p_report = sub.add_parser("report", help="Markdown/HTML report with plots, CSV and JSON from the benchmark storage")
    p_report.add_argument("--storage", default="stochopt-bench.db", help="SQLite file or SQLAlchemy URL")
    p_report.add_argument("--ruleset", default="external", choices=["external", "self"])
    p_report.add_argument("--out", default="stochopt-report", type=_output_folder,
                          help="report folder (default stochopt-report)")  # fmt: skip
    p_report.set_defaults(func=_report)

    p_ddp = sub.add_parser(
        "ddp", help="data-parallel digits MLP with gradient compression beside uncompressed DDP: loss, bytes, time",
        description="Spawns --nproc gloo processes, or runs as one rank under "
        "`torchrun --nproc-per-node N -m stochopt.cli ddp ...`.",
    )  # fmt: skip
    p_ddp.add_argument(
        "--compression",
        help="';'-separated name:key=value,... of none, topk, randomk, sign, powersgd (uncompressed 'none' is "
        f"always run too; default: {DEFAULT_COMPRESSION}; with --fsdp: none)",
    )  # fmt: skip
    p_ddp.add_argument("--nproc", type=_integer(), default=2, help="processes to spawn (default 2; torchrun: its own)")
    p_ddp.add_argument("--optimizer", default="sgd", help="a registered optimizer (default sgd)")
    p_ddp.add_argument("--lr", type=_number(0, above=True), default=0.1, help="learning rate (default 0.1)")
    p_ddp.add_argument("--optimizer-options", help="key=value,... (default: momentum=0.9 for sgd, else none)")
    p_ddp.add_argument("--steps", type=_integer(1), default=300, help="training steps per method (default 300)")
    p_ddp.add_argument("--batch-size", type=_integer(1), default=32, help="per process (default 32)")
    p_ddp.add_argument("--hidden", type=_integer(1), default=256, help="MLP width (default 256)")
    p_ddp.add_argument("--seed", type=_integer(0), default=0)
    p_ddp.add_argument("--eval-every", type=_integer(1), default=10,
                       help="steps between training-set losses (default 10)")  # fmt: skip
    p_ddp.add_argument("--zero", action="store_true", help="shard the optimizer state (ZeroRedundancyOptimizer)")
    p_ddp.add_argument("--fsdp", action="store_true",
                       help="train the model sharded with FSDP2 (fully_shard) beside uncompressed DDP: loss, optimizer "
                       "state bytes per rank, time per step (no --compression, no --zero)")  # fmt: skip
    p_ddp.add_argument("--master-addr", default="127.0.0.1")
    p_ddp.add_argument("--master-port", type=_integer(), help="in [1, 65535] (default: a free port)")
    p_ddp.add_argument("--timeout", type=_number(0, above=True), default=60.0,
                       help="seconds a rank waits for the others before failing (default 60)")  # fmt: skip
    p_ddp.add_argument("--out", default="ddp_results", type=_output_folder,
                       help="folder for JSON, CSV and the plot (default ddp_results)")  # fmt: skip
    p_ddp.add_argument("--quiet", action="store_true", help="no progress lines")
    p_ddp.add_argument("--resume", action="store_true",
                       help="take the methods an interrupted run finished (OUT/ddp_partial.json, same settings) "
                       "instead of training them again")  # fmt: skip
    p_ddp.set_defaults(func=_ddp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: ``sys.argv[1:]``) and return its exit status: 2, with one line
    ``stochopt: error: ...`` on stderr, for any bad input."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as err:
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"stochopt: error: {message}", file=sys.stderr)
        return 2
    except MissingExtraError as err:
        print(f"stochopt: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
