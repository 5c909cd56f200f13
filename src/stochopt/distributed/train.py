"""Data-parallel training of the digits MLP with each gradient compression beside uncompressed DDP: loss, bytes
communicated and time per step, saved as JSON and CSV, and a plot of loss against bytes (``stochopt ddp``).

Every method trains the same model from the same initialization on the same batches (a global batch of
``world_size x batch_size`` examples drawn by a seeded generator, each rank taking its slice), so the curves
differ only by what the compression did. ``fsdp=True`` trains the same model sharded with FSDP2
(``fully_shard`` on each Linear and on the root) beside uncompressed DDP instead: loss, optimizer-state bytes
per rank, bytes per rank and time per step."""

from __future__ import annotations

import csv
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stochopt.data import digits
from stochopt.distributed.hooks import COMPRESSIONS, compression_hook, register_compression
from stochopt.distributed.launch import (
    DistributedError,
    LaunchConfig,
    init_process_group,
    peer_failures,
    spawn,
    torchrun_rank,
)
from stochopt.distributed.state import CommStats, allreduce_bytes
from stochopt.distributed.zero import zero_optimizer
from stochopt.extras import require
from stochopt.registry import create_optimizer


def digits_mlp(hidden: int = 256) -> nn.Module:
    """64 -> hidden -> hidden -> 10 with ReLU: matrices large enough for low-rank compression to pay off."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@dataclass(frozen=True)
class Method:
    """A compression by name with its options, e.g. ``Method("topk", {"density": 0.01})``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return " ".join([self.name] + [f"{k}={v}" for k, v in self.options.items()])


def parse_method(spec: str) -> Method:
    """``"topk:density=0.01,momentum=0.9"`` -> Method; values are read as int, float or bool where they parse."""
    name, _, rest = spec.strip().partition(":")
    if name not in COMPRESSIONS:
        raise ValueError(f"unknown compression {name!r} in {spec!r}; known: {', '.join(COMPRESSIONS)}")
    return Method(name, parse_options(rest, spec))


def parse_options(text: str, where: str | None = None) -> dict[str, Any]:
    """``"momentum=0.9,nesterov=true"`` -> ``{"momentum": 0.9, "nesterov": True}``."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"option {item!r} in {where or text!r} is not key=value")
        options[key.strip()] = _value(value.strip())
    return options


def _value(text: str) -> Any:
    if text in ("True", "true", "False", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass
class DDPPlan:
    """What to train: the methods to compare (uncompressed ``none`` is added first when missing), the optimizer
    by registered name and its hyperparameters, steps, per-rank batch size, width, seed, loss-evaluation cadence,
    and whether to shard the optimizer state with ZeRO."""

    methods: list[Method]
    optimizer: str = "sgd"
    optimizer_options: dict[str, Any] = field(default_factory=lambda: {"lr": 0.1, "momentum": 0.9})
    steps: int = 300
    batch_size: int = 32
    hidden: int = 256
    seed: int = 0
    eval_every: int = 10
    zero: bool = False
    fsdp: bool = False

    def __post_init__(self) -> None:
        # unknown names and bad hyperparameters fail here, before any process starts
        try:
            create_optimizer(self.optimizer, [torch.zeros(1, requires_grad=True)], **self.optimizer_options)
        except TypeError as err:  # an option the optimizer does not take
            raise ValueError(f"optimizer_options: {err}") from None
        for name in ("steps", "batch_size", "hidden", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.fsdp:
            compressed = [m.label for m in self.methods if m.name not in ("none", "fsdp")]
            if compressed or self.zero:
                what = f"compression {', '.join(compressed)}" if compressed else "zero=True"
                raise ValueError(
                    f"fsdp=True compares FSDP2 with uncompressed DDP; {what} applies to DDP's gradients only: drop it"
                )
            self.methods = [Method("none"), Method("fsdp")]
            return
        for method in self.methods:  # bad options fail here, with their name, not inside a spawned rank
            compression_hook(method.name, **method.options)
        if not any(m.name == "none" for m in self.methods):
            self.methods = [Method("none"), *self.methods]


@dataclass
class MethodResult:
    """One method's run, measured on rank 0 (every rank sends the same bytes)."""

    label: str
    method: str
    options: dict[str, Any]
    final_train_loss: float  # nan when the run diverged (then ``steps`` ends where it stopped)
    val_accuracy: float
    bytes_sent: int
    dense_bytes: int
    ms_per_step: float
    steps: list[dict[str, float]]  # step, batch loss (rank 0), bytes sent and dense bytes in the step, seconds
    curve: list[dict[str, float]]  # step, training-set loss, bytes sent so far
    state_bytes: int = 0  # optimizer state on the rank that holds the most

    @property
    def compression(self) -> float:
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else math.inf


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_method(
    plan: DDPPlan,
    method: Method,
    progress: Callable[[str], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> MethodResult:
    """Train one method in the current process group (every rank calls it) and return rank 0's measurements.
    ``progress`` gets a line (on rank 0) at each evaluation; ``on_step(step)`` runs on every rank after each
    step (logging, checkpoints, fault injection in the tests)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(plan.seed)
    model = digits_mlp(plan.hidden)
    if method.name == "fsdp":
        ddp, state = _fully_shard(model), _FSDPBytes(model, world)
    else:
        ddp = nn.parallel.DistributedDataParallel(model)
        state = register_compression(ddp, method.name, **method.options)
    if plan.zero:
        optimizer = zero_optimizer(ddp.parameters(), plan.optimizer, **plan.optimizer_options)
    else:
        optimizer = create_optimizer(plan.optimizer, ddp.parameters(), **plan.optimizer_options)
    train, val = digits(plan.seed)
    x, y = train.tensors
    batches = torch.Generator().manual_seed(plan.seed + 1)
    steps, curve, elapsed = [], [], 0.0
    for step in range(plan.steps):
        batch = torch.randint(0, len(x), (world * plan.batch_size,), generator=batches)
        mine = batch[rank * plan.batch_size : (rank + 1) * plan.batch_size]
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x[mine]), y[mine])
        loss.backward()
        optimizer.step()
        seconds = time.perf_counter() - start
        elapsed += seconds
        if method.name == "fsdp":
            state.end_step(sum(getattr(optimizer, "sharded_bytes", [0, 0])) // 2)
        stats = state.stats
        steps.append({"step": step + 1, "loss": loss.item(), "bytes_sent": stats.last_bytes_sent,
                      "dense_bytes": stats.last_dense_bytes, "seconds": seconds})  # fmt: skip
        if on_step is not None:
            on_step(step + 1)
        diverged = not math.isfinite(steps[-1]["loss"])
        if (step + 1) % plan.eval_every == 0 or step + 1 == plan.steps or diverged:
            train_loss, _ = _evaluate(model, x, y)
            curve.append({"step": step + 1, "train_loss": train_loss, "bytes_sent": stats.bytes_sent})
            if progress is not None and rank == 0:
                progress(f"{method.label:<32} step {step + 1:5d}/{plan.steps}  train loss {train_loss:.4f}  "
                         f"sent {stats.bytes_sent / 1e6:8.3f} MB")  # fmt: skip
        if diverged:  # every rank sees the same averaged gradients, so all stop at the same step
            if progress is not None and rank == 0:
                progress(f"{method.label}: the loss is {steps[-1]['loss']} at step {step + 1}; stopped (diverged)")
            break
    _, val_accuracy = _evaluate(model, *val.tensors)
    state_bytes = torch.tensor([float(optimizer_state_bytes(optimizer))])
    dist.all_reduce(state_bytes, op=dist.ReduceOp.MAX)
    return MethodResult(
        method.label, method.name, dict(method.options), curve[-1]["train_loss"], val_accuracy,
        state.stats.bytes_sent, state.stats.dense_bytes, 1000 * elapsed / len(steps), steps, curve,
        int(state_bytes.item()),
    )  # fmt: skip


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


class _FSDPBytes:
    """FSDP2's bytes per rank and step, counted as ring collectives move them: the parameters all-gathered for
    the forward and again for the backward (``reshard_after_forward``), the gradients reduce-scattered, each
    ``(W - 1) / W`` of the model's bytes, and the gathers and scatters of whole-tensor optimizers (Muon's and
    Shampoo's matrices, engine/sharded.py: half of what this rank sent and received, as a ring's sent equals
    its received); the dense reference is DDP's all-reduce of the gradients."""

    def __init__(self, model: nn.Module, world: int) -> None:
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.per_step = -(-3 * (world - 1) * nbytes // world)
        self.dense = allreduce_bytes(nbytes, world)
        self.stats = CommStats()
        self.optimizer_bytes = 0

    def end_step(self, optimizer_bytes: int) -> None:
        """Close a step; ``optimizer_bytes``: the optimizer's gather/scatter bytes so far."""
        step_bytes = self.per_step + optimizer_bytes - self.optimizer_bytes
        self.optimizer_bytes = optimizer_bytes
        self.stats.add(step_bytes, step_bytes, self.dense)
        self.stats.end_step()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state this rank holds (its shards' local parts; full tensors it owns), step
    counters and other 0-d state aside."""
    from stochopt.engine.sharded import local

    tensors = [local(t) for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    tensors = [t for t in tensors if t.dim() > 0]
    return sum(t.numel() * t.element_size() for t in tensors)


#: the file in ``stochopt ddp --out`` that keeps the methods finished while a run goes on (removed at the end)
PARTIAL_FILE = "ddp_partial.json"


def _settings(plan: DDPPlan) -> dict[str, Any]:
    """Everything of ``plan`` but its methods, as JSON reads it back: what a reused result must share."""
    settings = asdict(plan)
    del settings["methods"]
    return json.loads(json.dumps(settings))


def save_partial(path: str | Path, plan: DDPPlan, results: list[MethodResult]) -> None:
    """Write the methods finished so far, with the settings they were trained with (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"settings": _settings(plan), "results": [asdict(r) for r in results]}))
    tmp.replace(path)


def load_partial(path: str | Path, plan: DDPPlan) -> list[MethodResult]:
    """The results in ``path`` (see :func:`save_partial`) of methods ``plan`` asks for; ValueError when they
    were trained with other settings."""
    saved = json.loads(Path(path).read_text())
    differ = {k: (v, saved["settings"].get(k)) for k, v in _settings(plan).items() if saved["settings"].get(k) != v}
    if differ:
        shown = ", ".join(f"{k}: now {now!r}, then {then!r}" for k, (now, then) in differ.items())
        raise ValueError(f"{path} holds results trained with other settings ({shown}); remove it or drop --resume")
    wanted = {m.label for m in plan.methods}
    return [MethodResult(**r) for r in saved["results"] if r["label"] in wanted]


def ddp_worker(
    rank: int,
    config: LaunchConfig,
    plan: DDPPlan,
    result_file: str | None,
    verbose: bool,
    done: list[MethodResult] | None = None,
) -> None:
    """One rank's whole run: join the group, train every method not in ``done`` (rank 0's list counts), and
    (rank 0) write the results to ``result_file`` after each method; failures of other ranks surface as
    :class:`DistributedError`."""
    init_process_group(rank, config)
    try:
        shared = [done or []]
        dist.broadcast_object_list(shared, src=0)  # under torchrun only rank 0 may have read the earlier results
        results = list(shared[0])
        finished = {r.label for r in results}
        for method in plan.methods:
            if method.label in finished:
                continue
            with peer_failures(rank, config, lambda m=method: f" while training {m.label}"):
                results.append(train_method(plan, method, print if verbose else None))
            if rank == 0 and result_file is not None:
                save_partial(result_file, plan, results)
    finally:
        dist.destroy_process_group()


def run_ddp(
    plan: DDPPlan,
    config: LaunchConfig | None = None,
    verbose: bool = True,
    start_method: str = "spawn",
    partial: str | Path | None = None,
    resume: bool = False,
) -> list[MethodResult] | None:
    """Train every method of ``plan`` data-parallel and return the results on rank 0 (None on other ranks).

    Under torchrun (RANK and WORLD_SIZE set) this process is one rank (of ``config`` only the timeout counts);
    otherwise ``config.world_size`` local processes are spawned. Rank 0 writes each finished method to
    ``partial`` (a temporary file when None), so that an interrupted run keeps them; ``resume=True`` takes the
    methods found there (trained with the same settings) instead of training them again."""
    launched = torchrun_rank(config.timeout if config is not None else 60.0)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(partial) if partial is not None else Path(tmp) / "results.json"
        is_rank0 = launched is None or launched[0] == 0
        done = load_partial(result_file, plan) if resume and is_rank0 and result_file.is_file() else []
        if launched is not None:
            rank, config = launched
            ddp_worker(rank, config, plan, str(result_file) if rank == 0 else None, verbose, done)
            if rank != 0:
                return None
        else:
            if config is None:
                raise ValueError("config is required when not launched by torchrun")
            spawn(ddp_worker, config, (plan, str(result_file), verbose, done), start_method)
        by_label = {r.label: r for r in load_partial(result_file, plan)} if result_file.is_file() else {}
        missing = [m.label for m in plan.methods if m.label not in by_label]
        if missing:
            raise DistributedError(f"the run ended without results from rank 0 for {', '.join(missing)}")
        return [by_label[m.label] for m in plan.methods]


def format_table(results: list[MethodResult]) -> str:
    """Final loss, accuracy, bytes per rank and compression against dense all-reduce, time per step."""
    head = (f"{'method':<34}{'train loss':>11}{'val acc':>9}{'MB sent/rank':>14}{'dense MB':>10}{'fewer bytes':>13}"
            f"{'ms/step':>9}{'state MB/rank':>15}")  # fmt: skip
    lines = [head]
    for r in results:
        lines.append(
            f"{r.label:<34}{_loss(r.final_train_loss):>11}{r.val_accuracy:>9.3f}{r.bytes_sent / 1e6:>14.3f}"
            f"{r.dense_bytes / 1e6:>10.3f}{r.compression:>12.1f}x{r.ms_per_step:>9.2f}{r.state_bytes / 1e6:>15.3f}"
        )
    return "\n".join(lines)


def _loss(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "diverged"


def write_results(results: list[MethodResult], out_dir: str | Path) -> list[Path]:
    """``ddp.json`` (everything), ``ddp_steps.csv`` (one row per method and step), ``ddp_summary.csv`` and
    ``ddp_loss_vs_bytes.png`` in ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "ddp.json", out / "ddp_summary.csv", out / "ddp_steps.csv", out / "ddp_loss_vs_bytes.png"]
    rows = [{**asdict(r), "compression": r.compression} for r in results]
    paths[0].write_text(json.dumps(rows, indent=1))
    summary = ["label", "final_train_loss", "val_accuracy", "bytes_sent", "dense_bytes", "compression", "ms_per_step",
               "state_bytes"]  # fmt: skip
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=summary, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with paths[2].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "step", "loss", "bytes_sent", "dense_bytes", "seconds"])
        writer.writeheader()
        for r in results:
            writer.writerows({"label": r.label, **s} for s in r.steps)
    plot_loss_vs_bytes(results, paths[3])
    return paths


def plot_loss_vs_bytes(results: list[MethodResult], path: str | Path) -> None:
    """Training-set loss against gradient bytes sent per rank (log scale), and against steps."""
    require("matplotlib", feature="the loss-against-bytes plot")
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    by_bytes, by_step = fig.subplots(1, 2)
    for r in results:
        steps = [c["step"] for c in r.curve]
        losses = [c["train_loss"] for c in r.curve]
        by_bytes.plot([c["bytes_sent"] for c in r.curve], losses, label=f"{r.label} ({r.compression:.0f}x)")
        by_step.plot(steps, losses, label=r.label)
    sent_any = any(c["bytes_sent"] > 0 for r in results for c in r.curve)  # a single rank sends nothing
    by_bytes.set(xscale="log" if sent_any else "linear", yscale="log", xlabel="gradient bytes sent per rank",
                 ylabel="training loss", title="loss against bytes communicated")  # fmt: skip
    by_step.set(yscale="log", xlabel="step", ylabel="training loss", title="loss against steps")
    starts = [r.curve[0]["train_loss"] for r in results if r.curve and math.isfinite(r.curve[0]["train_loss"])]
    lows = [c["train_loss"] for r in results for c in r.curve if 0 < c["train_loss"] < math.inf]
    if starts and lows:  # a diverging method would squash every other curve to the bottom
        for ax in (by_bytes, by_step):
            ax.set_ylim(0.7 * min(lows), 3 * max(starts))
    for ax in (by_bytes, by_step):
        ax.grid(alpha=0.3, which="both")
    by_bytes.legend(fontsize=8)
    fig.savefig(path, dpi=120)
