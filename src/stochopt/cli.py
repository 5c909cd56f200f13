"""The ``stochopt`` command: thin wrappers that parse, call one library function and print."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _list(args: argparse.Namespace) -> int:
    from stochopt.registry import list_optimizers, optimizer_entry

    for name in list_optimizers():
        entry = optimizer_entry(name)
        print(f"{name:<10} {entry.cls.__name__:<10} {entry.summary}  [{entry.reference}]")
    return 0


def _speed(args: argparse.Namespace) -> int:
    from stochopt.speed import as_json, format_table, run_speed

    if args.matrix:
        from stochopt.speed_matrix import format_matrix_table, run_matrix_speed

        results, total = run_matrix_speed(args.params, args.steps, progress=lambda m: print(m, file=sys.stderr))
        print(format_matrix_table(results, total))
        if args.json:
            Path(args.json).write_text(json.dumps(as_json(results, total), indent=2))
            print(f"wrote {args.json}")
        return 0
    names = [n.strip() for n in args.optimizers.split(",")] if args.optimizers else None
    results, total = run_speed(
        names, args.params, steps=args.steps, warmup=args.warmup, progress=lambda m: print(m, file=sys.stderr)
    )
    print(format_table(results, total))
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(results, total), indent=2))
        print(f"wrote {args.json}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from stochopt.training.schedules import plot_schedules, schedule_curve

    curves = {}
    for name in args.names.split(","):
        curves[name.strip()] = schedule_curve(
            name.strip(), lr=args.lr, total_steps=args.steps, warmup_steps=args.warmup, decay_steps=args.decay_steps,
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
    from stochopt.memory import GPT2, Transformer, compare, format_table, plot_memory

    source: dict = {}
    if args.transformer:
        if args.transformer in GPT2:
            spec = GPT2[args.transformer]
            source["transformer"] = Transformer(spec.layers, spec.hidden, spec.heads, args.seq_len, spec.vocab,
                                                args.micro_batch)  # fmt: skip
        else:
            layers, hidden, heads = (int(v) for v in args.transformer.split(","))
            source["transformer"] = Transformer(layers, hidden, heads, args.seq_len, args.vocab, args.micro_batch)
    elif args.module:
        source["module"] = args.module
        if args.input_shape:
            import torch

            source["example_input"] = torch.zeros(tuple(int(v) for v in args.input_shape.split(",")))
    else:
        source["num_params"] = int(float(args.params))
    estimates = compare(
        [name.strip() for name in args.optimizer.split(",")], precision=args.precision, devices=args.devices,
        zero_stage=args.zero, checkpointing=args.checkpointing, flash_attention=args.flash_attention,
        bucket_bytes=None if args.bucket_mb is None else int(args.bucket_mb * 2**20), **source,
    )  # fmt: skip
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
        function = viz.surface(args.function)
        start = tuple(float(v) for v in args.start.split(",")) if args.start else None
        paths = {spec.strip(): viz.run_path(function, spec, start, args.steps) for spec in args.optimizers.split(";")}
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
    from rich.console import Console
    from rich.table import Table

    from stochopt.bench.progress import RichProgress
    from stochopt.bench.report import tables, write_report
    from stochopt.bench.suite import DEFAULT_ALGORITHMS, QUICK

    def names(values: list[str] | None) -> list[str] | None:
        return [n.strip() for v in values for n in v.split(",") if n.strip()] if values else None

    options = {}
    for item in args.option or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--option must be KEY=VALUE, got {item!r}")
        options[key] = value
    if args.action == "calibrate":
        from stochopt.bench.calibrate import calibrate
        from stochopt.bench.workloads import WORKLOADS

        try:
            with RichProgress() as progress:
                targets = calibrate(
                    names(args.workloads) or list(WORKLOADS), _given(args.trials, 5), _given(args.studies, 3),
                    args.seed, args.storage, args.jobs, progress, args.targets,
                )  # fmt: skip
        except KeyboardInterrupt:
            print(f"interrupted; finished trials are kept in {args.storage}: rerun to resume", file=sys.stderr)
            return 130
        for name, entry in targets.items():
            print(f"{name:<16} target {entry['target']:.6g}   {entry['source']}")
        return 0

    from stochopt.bench.suite import run_benchmark

    quick = QUICK if args.quick else {}
    try:
        with RichProgress() as progress:
            result = run_benchmark(
                names(args.workloads) or quick.get("workloads") or _all_workloads(),
                names(args.algorithms) or quick.get("algorithms") or DEFAULT_ALGORITHMS,
                args.ruleset or quick.get("ruleset", "external"), _given(args.trials, quick.get("trials", 5)),
                _given(args.studies, quick.get("studies", 1)), args.storage, args.jobs, args.seed, progress, options,
            )  # fmt: skip
    except KeyboardInterrupt:
        print(f"interrupted; finished trials are kept in {args.storage}: rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 130
    header, rows, score_rows = tables(result)
    table = Table(*header, title=f"time to target ({result.ruleset} tuning): seconds (steps)")
    for row in rows + score_rows:
        table.add_row(*row)
    Console().print(table)
    print(f"wrote {write_report(result, args.out)}")
    return 0


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def _all_workloads() -> list[str]:
    from stochopt.bench.workloads import WORKLOADS

    return list(WORKLOADS)


def _report(args: argparse.Namespace) -> int:
    from stochopt.bench.report import write_report
    from stochopt.bench.suite import load_result

    print(f"wrote {write_report(load_result(args.storage, args.ruleset), args.out)}")
    return 0


def _ddp(args: argparse.Namespace) -> int:
    from stochopt.distributed import DDPPlan, DistributedError, LaunchConfig, free_port, parse_method
    from stochopt.distributed.train import PARTIAL_FILE, format_table, parse_options, run_ddp, write_results

    if args.optimizer_options is None:
        options = {"momentum": 0.9} if args.optimizer == "sgd" else {}
    else:
        options = parse_options(args.optimizer_options, "--optimizer-options")
    plan = DDPPlan(
        [parse_method(spec) for spec in args.compression.split(";") if spec.strip()], optimizer=args.optimizer,
        optimizer_options={"lr": args.lr, **options}, steps=args.steps, batch_size=args.batch_size,
        hidden=args.hidden, seed=args.seed, eval_every=args.eval_every, zero=args.zero,
    )  # fmt: skip
    port = args.master_port if args.master_port is not None else free_port(args.master_addr)
    config = LaunchConfig(args.nproc, args.master_addr, port, args.timeout)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    partial = Path(args.out) / PARTIAL_FILE
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
    parser = argparse.ArgumentParser(prog="stochopt", description="stochastic optimizers for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="every optimizer, with what it is and its reference")
    p_list.set_defaults(func=_list)
    p_speed = sub.add_parser("speed", help="time one optimizer step in every execution path")
    p_speed.add_argument("--optimizers", help="comma-separated names (default: all elementwise optimizers)")
    p_speed.add_argument("--params", type=int, default=30_000_000, help="total parameters (default 30M)")
    p_speed.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    p_speed.add_argument(
        "--warmup",
        type=int,
        default=7,
        help="untimed steps after the first (default 7, past kernels that switch on later: Ranger syncs every 6)",
    )
    p_speed.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    p_speed.add_argument(
        "--matrix", action="store_true",
        help="amortized step of Shampoo and Muon beside Adam and torch.optim.Muon, on matrices (--params 3e6 is a "
        "good size)",
    )  # fmt: skip
    p_speed.set_defaults(func=_speed)

    from stochopt.training.schedules import SCHEDULES

    p_sched = sub.add_parser("schedule", help="a learning-rate schedule's values, and a plot of it")
    p_sched.add_argument("names", help=f"comma-separated schedules to compare: {', '.join(SCHEDULES)}")
    p_sched.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p_sched.add_argument("--steps", type=int, default=1000, help="total steps (default 1000)")
    p_sched.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    p_sched.add_argument("--decay-steps", type=int, help="wsd: length of the final decay (default steps/5)")
    p_sched.add_argument("--final-lr-ratio", type=float, default=0.0, help="floor as a fraction of lr (default 0)")
    p_sched.add_argument("--timescale", type=float, help="inverse-sqrt: tau (default: warmup, or 1)")
    p_sched.add_argument("--png", metavar="PATH", help="write a plot of lr against step")
    p_sched.set_defaults(func=_schedule)

    p_mem = sub.add_parser("memory", help="training memory per device: model states, activations, buffers")
    what = p_mem.add_mutually_exclusive_group()
    what.add_argument("--params", default="1.5e9", help="number of parameters (default 1.5e9, the seeds' GPT-2)")
    what.add_argument("--transformer", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or LAYERS,HIDDEN,HEADS")
    what.add_argument("--module", help="an nn.Module by import path, package.module:Name")
    p_mem.add_argument("--input-shape", help="with --module: example input shape, e.g. 8,3,32,32 (activations)")
    p_mem.add_argument("--optimizer", default="adam", help="comma-separated: stochopt names or torch.optim.Name")
    p_mem.add_argument("--precision", default="mixed", choices=["fp32", "mixed", "bf16"])
    p_mem.add_argument("--devices", type=int, default=1)
    p_mem.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage")
    p_mem.add_argument("--seq-len", type=int, default=1024)
    p_mem.add_argument("--micro-batch", type=int, default=1)
    p_mem.add_argument("--vocab", type=int, default=50257)
    p_mem.add_argument("--checkpointing", default="none", choices=["none", "selective", "full"])
    p_mem.add_argument("--flash-attention", action="store_true")
    p_mem.add_argument("--bucket-mb", type=float, help="all-reduce bucket (default: one fused fp32 buffer)")
    p_mem.add_argument("--png", metavar="PATH", help="write a stacked bar chart")
    p_mem.set_defaults(func=_memory)

    from stochopt.viz.functions import FUNCTIONS

    p_viz = sub.add_parser("viz", help="optimizer paths on 2-D functions; the seeds' small figures")
    p_viz.add_argument("figure", nargs="?", default="paths", choices=["paths", "momentum", "bias-correction"])
    p_viz.add_argument("--function", default="rosenbrock", help=f"one of {', '.join(FUNCTIONS)}")
    p_viz.add_argument(
        "--optimizers", default="sgd:lr=1e-3;sgd:lr=1e-3,momentum=0.9,nesterov=True;adam:lr=0.05",
        help="';'-separated name:key=value,... (default: GD, Nesterov, Adam)",
    )  # fmt: skip
    p_viz.add_argument("--steps", type=int, default=300)
    p_viz.add_argument("--start", help="x,y (default: the function's usual start)")
    p_viz.add_argument("--png", default="viz.png", help="output PNG (default viz.png)")
    p_viz.add_argument("--gif", help="also an animation")
    p_viz.add_argument("--loss-png", help="also f - f* against steps")
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
    p_bench.add_argument("--trials", type=int, help="trials per study (external tuning; default 5)")
    p_bench.add_argument("--studies", type=int, help="studies per workload and algorithm (default 1; calibrate 3)")
    p_bench.add_argument(
        "--storage",
        default="stochopt-bench.db",
        help="SQLite file or SQLAlchemy URL, e.g. postgresql://host/db (default stochopt-bench.db)",
    )
    p_bench.add_argument("--jobs", type=int, default=1, help="trials run in parallel processes (default 1)")
    p_bench.add_argument("--seed", type=int, default=0)
    p_bench.add_argument("--option", action="append", metavar="KEY=VALUE", help="workload option, e.g. data_dir=...")
    p_bench.add_argument("--out", default="stochopt-report", help="report folder (default stochopt-report)")
    p_bench.add_argument("--targets", help="calibrate: the targets file to update (default: the shipped one)")
    p_bench.set_defaults(func=_bench)

    p_report = sub.add_parser("report", help="Markdown/HTML report with plots, CSV and JSON from the benchmark storage")
    p_report.add_argument("--storage", default="stochopt-bench.db", help="SQLite file or SQLAlchemy URL")
    p_report.add_argument("--ruleset", default="external", choices=["external", "self"])
    p_report.add_argument("--out", default="stochopt-report", help="report folder (default stochopt-report)")
    p_report.set_defaults(func=_report)

    p_ddp = sub.add_parser(
        "ddp", help="data-parallel digits MLP with gradient compression beside uncompressed DDP: loss, bytes, time",
        description="Spawns --nproc gloo processes, or runs as one rank under "
        "`torchrun --nproc-per-node N -m stochopt.cli ddp ...`.",
    )  # fmt: skip
    p_ddp.add_argument(
        "--compression", default="topk:density=0.01;randomk:density=0.01;sign;powersgd:rank=2",
        help="';'-separated name:key=value,... of none, topk, randomk, sign, powersgd (uncompressed 'none' is "
        "always run too; default: %(default)s)",
    )  # fmt: skip
    p_ddp.add_argument("--nproc", type=int, default=2, help="processes to spawn (default 2; torchrun: its own)")
    p_ddp.add_argument("--optimizer", default="sgd", help="a registered optimizer (default sgd)")
    p_ddp.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    p_ddp.add_argument("--optimizer-options", help="key=value,... (default: momentum=0.9 for sgd, else none)")
    p_ddp.add_argument("--steps", type=int, default=300)
    p_ddp.add_argument("--batch-size", type=int, default=32, help="per process (default 32)")
    p_ddp.add_argument("--hidden", type=int, default=256, help="MLP width (default 256)")
    p_ddp.add_argument("--seed", type=int, default=0)
    p_ddp.add_argument("--eval-every", type=int, default=10, help="steps between training-set losses (default 10)")
    p_ddp.add_argument("--zero", action="store_true", help="shard the optimizer state (ZeroRedundancyOptimizer)")
    p_ddp.add_argument("--master-addr", default="127.0.0.1")
    p_ddp.add_argument("--master-port", type=int, help="default: a free port")
    p_ddp.add_argument("--timeout", type=float, default=60.0,
                       help="seconds a rank waits for the others before failing (default 60)")  # fmt: skip
    p_ddp.add_argument("--out", default="ddp_results", help="folder for JSON, CSV and the plot (default ddp_results)")
    p_ddp.add_argument("--quiet", action="store_true", help="no progress lines")
    p_ddp.add_argument("--resume", action="store_true",
                       help="take the methods an interrupted run finished (OUT/ddp_partial.json, same settings) "
                       "instead of training them again")  # fmt: skip
    p_ddp.set_defaults(func=_ddp)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"stochopt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
