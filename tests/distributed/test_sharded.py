"""Sharded (FSDP2 / DTensor) parameters on gloo processes, against single-process training on the same global
batches, in float64:

- every registered optimizer in every path, its parameters ``Shard(0)`` DTensors (what ``fully_shard`` makes
  of them), on 2 processes;
- ``fully_shard`` models (each Linear and the root) trained with a half batch per rank, on 2 and 4 processes,
  for the optimizers whose state or statistics are whole-tensor (AdaFisher's factors from each rank's batch);
- optimizer-state bytes per rank (they add up to the single process's, and fall with the world size), the
  non-finite policy deciding alike on every rank, DTensor and plain parameters in one group, and refusals.

Each world's cases run in one set of processes (module fixtures), each case a test reading its result.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import stochopt
from stochopt.engine import sharded
from tests.conftest import PATHS, clone_params, gloo_group, make_params, set_grads
from tests.distributed.conftest import START

NAMES = [name for name in stochopt.list_optimizers() if name != "adafisher"]  # AdaFisher needs a model: below
SHARDED_PATHS = ["loop", "foreach", "fused", "capturable", "default"]
COMPILED_PATHS = ("fused", "capturable")
# On 4 processes every optimizer runs the eager paths, and the compiled ones these: one per way the engine steps
# a shard (an elementwise kernel in number and tensor mode, the whole-tensor stand-in, Muon's split, Prodigy's
# reduction over the ranks). Each rank traces every compiled kernel itself (dynamo's cache is per process): all
# of them on 4 ranks would add ~100 s of the suite's 2 cores (measured) for kernels the 2-process run checks.
FOUR_COMPILED = ("adamw", "nadam", "lamb", "muon", "prodigy", "adamw_schedulefree")
# uneven row counts (a rank with fewer rows; one with none), a 3-d tensor, vectors, a single element
SHAPES = [(30, 16), (7, 5), (11,), (3, 4, 2), (1,), (16, 12)]
STEPS = 12
MODEL_OPTIMIZERS = ["adamw", "muon", "adafisher", "shampoo", "soap", "lamb", "adafactor", "prodigy"]
# SOAP: sides above 8 keep the identity. A basis of a rank-deficient factor (the 16-row sides of these layers'
# first gradients) is the QR of rounding noise in its null space, so the last bits in which a reduce-scatter's
# average differs from the full batch's would pick another basis (as they would between any two runs)
MODEL_EXTRA = {"soap": {"max_precond_dim": 8}}


def _make(name: str, params, **extra):
    from tests.test_contract import CONTRACT_HP

    return stochopt.create_optimizer(name, params, **{**CONTRACT_HP.get(name, {}), **extra})


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    from stochopt.engine.sharded import local

    return sum(
        local(t).numel() * t.element_size()
        for state in opt.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


def _on_rank_zero(rank: int, run):
    """``run()`` (no collectives inside) on rank 0 alone, its result sent to every rank: the single-process
    reference is computed once, not once per rank (on 2 cores, 4 ranks would compile and run it side by side)."""
    result = [run() if rank == 0 else None]
    dist.broadcast_object_list(result, src=0)
    return result[0]


def _path_cases(rank: int, world: int, mesh, out: dict) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    for name in NAMES:
        for path in SHARDED_PATHS:
            if world == 4 and path in COMPILED_PATHS and name not in FOUR_COMPILED:
                continue
            flags = PATHS[path]
            if path == "capturable" and not stochopt.optimizer_entry(name).cls._capturable:
                continue
            full = make_params(SHAPES)

            def reference(name=name, flags=flags, full=full) -> tuple[list, list]:
                ref = clone_params(full)
                ref_opt, grads = _make(name, ref, **flags), []
                for t in range(STEPS):
                    set_grads(ref, t)
                    grads.append([q.grad for q in ref])
                    ref_opt.step()
                return grads, [q.detach() for q in ref]

            grads, ref = _on_rank_zero(rank, reference)
            shards = [distribute_tensor(p.detach(), mesh, [Shard(0)]).requires_grad_() for p in full]
            opt = _make(name, shards, **flags)
            for step_grads in grads:  # the reference's gradients, distributed
                for p, g in zip(shards, step_grads):
                    p.grad = distribute_tensor(g, mesh, [Shard(0)])
                opt.step()
            out[(name, path)] = max((p.full_tensor() - q).abs().max().item() for p, q in zip(shards, ref))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _model_cases(rank: int, world: int, mesh, out: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    for name in MODEL_OPTIMIZERS:
        net, ref = _model(), _model()
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        opt, ref_opt = _make(name, net, **MODEL_EXTRA.get(name, {})), _make(name, ref, **MODEL_EXTRA.get(name, {}))
        for _ in range(8):
            opt.zero_grad()
            F.cross_entropy(net(x[rank::world]), y[rank::world]).backward()
            opt.step()
            ref_opt.zero_grad()
            # the mean over the ranks' halves, as FSDP2's reduce-scatter averages their mean gradients
            sum(F.cross_entropy(ref(x[r::world]), y[r::world]) for r in range(world)).div(world).backward()
            ref_opt.step()
        out[("model", name)] = max(
            (p.full_tensor() - q).abs().max().item() for p, q in zip(net.parameters(), ref.parameters())
        )
        out[("moved", name)] = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), _model().parameters()))
        out[("bytes", name)] = (_state_bytes(opt), _state_bytes(ref_opt))
        out[("state_sharded", name)] = all(
            sharded.is_sharded(t) for state in opt.state.values() for t in state.values() if t.dim() > 0
        )
        out[("sent", name)] = opt.sharded_bytes[0]


def _policy_cases(rank: int, world: int, mesh, out: dict) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    for name in ("adamw", "lamb"):  # elementwise (each rank checks its shard) and whole-tensor (the owner checks)
        for policy in ("skip", "raise"):
            p = distribute_tensor(torch.ones(8, 3, dtype=torch.float64), mesh, [Shard(0)]).requires_grad_()
            opt = stochopt.create_optimizer(name, [p], lr=0.1, nonfinite=policy)
            grad = torch.ones(8, 3, dtype=torch.float64)
            grad[7, 0] = float("inf")  # in the last rank's shard only
            p.grad = distribute_tensor(grad, mesh, [Shard(0)])
            try:
                opt.step()
                out[("nonfinite", name, policy)] = ("skipped", opt.skipped_steps, p.full_tensor().eq(1).all().item())
            except stochopt.engine.NonFiniteGradientError as err:
                out[("nonfinite", name, policy)] = ("raised", str(err))
    # a plain and a sharded parameter in one group: elementwise and whole-tensor updates
    for name in ("adamw", "lamb", "prodigy"):
        full = make_params([(9, 4), (5,)])
        ref = clone_params(full)
        mixed = [distribute_tensor(full[0].detach(), mesh, [Shard(0)]).requires_grad_(), clone_params(full[1:])[0]]
        try:
            opt, ref_opt = _make(name, mixed), _make(name, ref)
            for t in range(STEPS):
                set_grads(ref, t)
                mixed[0].grad = distribute_tensor(ref[0].grad, mesh, [Shard(0)])
                mixed[1].grad = ref[1].grad.clone()
                opt.step()
                ref_opt.step()
            out[("mixed", name)] = max(
                (mixed[0].full_tensor() - ref[0]).abs().max().item(), (mixed[1] - ref[1]).abs().max().item()
            )
        except ValueError as err:
            out[("mixed", name)] = str(err)
    p = distribute_tensor(torch.ones(8, 3, dtype=torch.float64), mesh, [Shard(0)]).requires_grad_()
    try:
        stochopt.Muon([p], distributed=True)
    except ValueError as err:
        out["muon_distributed"] = str(err)
    half = distribute_tensor(torch.ones(8, 3, dtype=torch.bfloat16), mesh, [Shard(0)]).requires_grad_()
    try:
        stochopt.training.MasterWeights(stochopt.AdamW([half]))
    except ValueError as err:
        out["master_weights"] = str(err)


# ----- sharded checkpoints: written on 2 processes, resumed on 2 (bit-exact), on 4 and on 1 -----------------------
CHECKPOINTED = {
    "adamw": lambda m: stochopt.AdamW(m.parameters(), lr=0.01, weight_decay=0.1),
    "muon": lambda m: stochopt.create_optimizer("muon", m, lr=0.02, ns_dtype=torch.float64),
    "shampoo": lambda m: stochopt.Shampoo(m.parameters(), lr=0.05, precondition_frequency=2),
    "lookahead": lambda m: stochopt.Lookahead(stochopt.AdamW(m.parameters(), lr=0.01), k=3),
}
CHECKPOINT_DIR = ""  # set in each worker


def _sharded_model(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    net = _model()
    if mesh is not None:
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
    return net


def _train(net, opt, rank: int, world: int, start: int, steps: int) -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (64,), generator=gen)
    for t in range(start, start + steps):
        xb, yb = x[16 * (t % 4) : 16 * (t % 4 + 1)], y[16 * (t % 4) : 16 * (t % 4 + 1)]
        opt.zero_grad()
        F.cross_entropy(net(xb[rank::world]), yb[rank::world]).backward()
        opt.step()


def _full(net) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in net.parameters()]


def _resume(name: str, rank: int, world: int, mesh) -> float:
    """Load the checkpoint written after 4 steps, train 4 more, and return the largest difference from the
    run that went on without stopping."""
    from stochopt.distributed import load_checkpoint

    net = _sharded_model(mesh)
    opt = CHECKPOINTED[name](net)
    step, extra = load_checkpoint(f"{CHECKPOINT_DIR}/{name}", net, opt)
    assert (step, extra) == (4, {"name": name})
    _train(net, opt, rank, world, 4, 4)
    reference = torch.load(f"{CHECKPOINT_DIR}/{name}.final.pt")
    return max((a - b).abs().max().item() for a, b in zip(_full(net), reference))


def _save_cases(rank: int, world: int, mesh, out: dict) -> None:
    from stochopt.distributed import save_checkpoint

    for name in CHECKPOINTED:
        net = _sharded_model(mesh)
        opt = CHECKPOINTED[name](net)
        _train(net, opt, rank, world, 0, 4)
        save_checkpoint(f"{CHECKPOINT_DIR}/{name}", net, opt, step=4, extra={"name": name})
        _train(net, opt, rank, world, 4, 4)
        final = _full(net)
        if rank == 0:
            torch.save(final, f"{CHECKPOINT_DIR}/{name}.final.pt")
        dist.barrier()
        out[("resumed", name)] = _resume(name, rank, world, mesh)


def _load_cases(rank: int, world: int, mesh, out: dict) -> None:
    for name in CHECKPOINTED:
        out[("resumed", name)] = _resume(name, rank, world, mesh)


def _worker(rank: int, world: int, init_file: str, results: str, cases: list[str], checkpoints: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    global CHECKPOINT_DIR
    CHECKPOINT_DIR = checkpoints
    torch.set_num_threads(1)
    import stochopt.engine.fused as fused

    fused.BUCKET_WIDTH = 1  # as tests/conftest.py: the kernels the single-process tests compiled
    stochopt.engine.EngineOptimizer.use_native_fused = False  # "fused" and "capturable" are stochopt's kernel
    with gloo_group(rank, world, init_file):
        mesh = init_device_mesh("cpu", (world,))
        out: dict = {}
        for case in cases:
            globals()[f"_{case}_cases"](rank, world, mesh, out)
        if world == 4:
            _mesh2d_case(rank, out)
        torch.save(out, f"{results}.{rank}")


def _mesh2d_case(rank: int, out: dict) -> None:
    """A 2 x 2 mesh (hybrid sharding: replicated over the first dimension, sharded over the second): elementwise
    updates run on it; whole-tensor ones refuse it by name."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2))
    full = make_params([(9, 4)])
    ref = clone_params(full)
    p = distribute_tensor(full[0].detach(), mesh, [Replicate(), Shard(0)]).requires_grad_()
    opt, ref_opt = _make("adamw", [p]), _make("adamw", ref)
    for t in range(STEPS):
        set_grads(ref, t)
        p.grad = distribute_tensor(ref[0].grad, mesh, [Replicate(), Shard(0)])
        opt.step()
        ref_opt.step()
    out["mesh2d_adamw"] = (p.full_tensor() - ref[0]).abs().max().item()
    lamb = _make("lamb", [p])
    try:
        lamb.step()
    except ValueError as err:
        out["mesh2d_lamb"] = str(err)


def _spawn(tmp_path_factory, world: int, cases: list[str], checkpoints: str) -> list[dict]:
    directory = tmp_path_factory.mktemp(f"sharded{world}")
    results = str(directory / "results.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    args = (world, str(directory / "init"), results, cases, checkpoints)
    mp.start_processes(_worker, args=args, nprocs=world, start_method=START)
    return [torch.load(f"{results}.{rank}", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def two(tmp_path_factory, checkpoints) -> list[dict]:
    return _spawn(tmp_path_factory, 2, ["path", "model", "policy", "save"], checkpoints)


@pytest.fixture(scope="module")
def four(tmp_path_factory, checkpoints, two) -> list[dict]:
    return _spawn(tmp_path_factory, 4, ["path", "model", "load"], checkpoints)


PATH_CASES = [
    (name, path, world)
    for world in (2, 4)
    for name in NAMES
    for path in SHARDED_PATHS
    if world == 2 or path not in COMPILED_PATHS or name in FOUR_COMPILED
]


@pytest.mark.parametrize("name, path, world", PATH_CASES)
def test_every_optimizer_on_sharded_params_equals_one_process(two, four, world: int, name: str, path: str) -> None:
    results = two if world == 2 else four
    if path == "capturable" and not stochopt.optimizer_entry(name).cls._capturable:
        assert (name, path) not in results[0]  # refused by name: tests/test_contract.py test_execution_paths_agree
        return
    for out in results:
        assert out[(name, path)] <= 1e-12


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", MODEL_OPTIMIZERS)
def test_fully_sharded_model_trains_as_one_process(two, four, world: int, name: str) -> None:
    results = two if world == 2 else four
    assert results[0][("moved", name)] > 1e-3  # the reference moved: the comparison is not of two still models
    # Shampoo's inverse roots turn the last bits in which a reduce-scatter's average differs from the full batch's
    # into ~1e-10 (as under DDP: tests/optim/test_matrix_distributed.py)
    tolerance = 1e-8 if name == "shampoo" else 1e-10
    for out in results:
        assert out[("model", name)] <= tolerance
    # state bytes: the ranks' shares add up to one process's and none holds all of it
    per_rank = [out[("bytes", name)][0] for out in results]
    single = results[0][("bytes", name)][1]
    assert sum(per_rank) == single
    assert max(per_rank) < single


@pytest.mark.parametrize("world", [2, 4])
def test_muon_keeps_its_momentum_with_the_shard(two, four, world: int) -> None:
    """Muon's momentum is elementwise: it stays sharded like the parameter (as AdamW's moments do; Shampoo's
    factors are whole), and only the momentum direction travels to each matrix's owner and its orthogonalized
    update back: two transfers of the matrix per step (the stand-in path, which Shampoo takes, makes three)."""
    results = two if world == 2 else four
    for out in results:
        assert out[("state_sharded", "muon")] and out[("state_sharded", "adamw")]
        assert not out[("state_sharded", "shampoo")]
    # the Muon matrices of _model (the last Linear is the head, AdamW's): 16 x 6 and 16 x 16 float64, each
    # transfer padded to the largest shard (16 / world rows); the owner sends (w - 1) pieces, the others one
    padded = [(16 // world) * cols * 8 for cols in (6, 16)]
    sent = sum(out[("sent", "muon")] for out in results)
    assert sent == 8 * sum(2 * (world - 1) * size for size in padded)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_nonfinite_policy_decides_alike_on_every_rank(two, name: str) -> None:
    for out in two:
        assert out[("nonfinite", name, "skip")] == ("skipped", 1, True)
        kind, message = out[("nonfinite", name, "raise")]
        assert kind == "raised" and "holds inf or NaN" in message


def test_sharded_and_plain_params_in_one_group(two) -> None:
    for out in two:
        assert out[("mixed", "adamw")] <= 1e-12
        assert out[("mixed", "lamb")] <= 1e-12
        assert "sharded (DTensor) and plain parameters together" in out[("mixed", "prodigy")]


def test_refusals_name_the_reason(two, four) -> None:
    assert "drop distributed=True" in two[0]["muon_distributed"]
    says = two[0]["master_weights"]
    assert "torch.bfloat16 parameter of shape (8, 3) is sharded" in says and "MixedPrecisionPolicy" in says
    for out in four:
        assert out["mesh2d_adamw"] <= 1e-12
        assert "one-dimensional mesh" in out["mesh2d_lamb"] and "(2, 2)" in out["mesh2d_lamb"]


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_a_sharded_checkpoint_resumes_on_2_4_and_1_processes(two, four, checkpoints, name: str) -> None:
    """Written by 2 processes with torch.distributed.checkpoint (stochopt.distributed.save_checkpoint): resumed
    on 2 bit for bit; on 4 the same training to float64 rounding (a reduce-scatter over 4 sums in another
    order); and in this process, unsharded."""
    global CHECKPOINT_DIR
    for out in two:
        assert out[("resumed", name)] == 0.0
    # Shampoo's inverse roots amplify that rounding (measured: 2.4e-8 after 4 steps; see the model test)
    tolerance = 1e-6 if name == "shampoo" else 1e-12
    for out in four:
        assert out[("resumed", name)] <= tolerance
    CHECKPOINT_DIR = checkpoints
    assert _resume(name, 0, 1, None) <= tolerance
