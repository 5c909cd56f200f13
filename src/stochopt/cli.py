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
