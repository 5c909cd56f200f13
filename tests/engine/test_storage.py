"""Lean storage (engine/storage.py): 8-bit block-wise quantized moments (``state_dtype="int8"``) and bfloat16
weights with stochastic rounding or compensation (``weight_rounding``), against loops written here from the
papers' equations (Dettmers et al., 2022, arXiv 2110.02861; Kahan summation), in every execution path.

The 8-bit references run in float64 and code each moment as the nearest value of the map they build (the
paper's dynamic map) times the block's float32 absolute maximum: the engine must produce the same codes, so the
comparison is exact on the codes, not a tolerance on training curves.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import stochopt
from stochopt.engine import storage
from stochopt.engine.layout import state_nbytes, stored_layout
from tests.conftest import PATHS

STEPS = 100
SHAPES = ((80, 64), (4096,), (100,))  # three blocks (the last partial), exactly two, and a small tensor
BLOCK = 2048


def paper_map(signed: bool) -> torch.Tensor:
    """The dynamic map of the paper, built here: for decimal exponents -6..0, the midpoints of 2**e (signed:
    each sign) or 2**(e + 1) equal steps of [0.1, 1] * 10**e, and 0 and 1."""
    values = [0.0, 1.0]
    for e in range(7):
        n = 2**e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        mids = (edges[1:] + edges[:-1]) / 2 * 10.0 ** (e - 6)
        values += mids.tolist() + ((-mids).tolist() if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float64)


def ref_encode(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest map value of x / absmax per block of 2048 (row-major), the scale stored in float32."""
    flat = x.reshape(-1)
    codes = torch.empty(flat.numel(), dtype=torch.uint8)
    scales = []
    table = paper_map(signed)
    for start in range(0, flat.numel(), BLOCK):
        block = flat[start : start + BLOCK]
        absmax = block.abs().max().to(torch.float32)
        scale = absmax.double() if absmax > 0 else torch.tensor(1.0, dtype=torch.float64)
        nearest = (block[:, None] / scale - table[None, :]).abs().argmin(dim=1)
        if not signed:  # a positive second moment is coded at least as the smallest positive value
            nearest = torch.where((block > 0) & (nearest == 0), 1, nearest)
        codes[start : start + BLOCK] = nearest.to(torch.uint8)
        scales.append(absmax)
    return codes.view(x.shape), torch.stack(scales)


def ref_decode(codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    flat = paper_map(signed)[codes.reshape(-1).long()]
    block_of = torch.arange(flat.numel()) // BLOCK
    return (flat * scales.double()[block_of]).view(codes.shape)


def params(shapes=SHAPES, dtype=torch.float64, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def grads(ps: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """A noisy quadratic: g = p + noise, the noise of each step drawn from its own seed."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [p.detach().double() + torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]


def train(opt: torch.optim.Optimizer, ps: list[torch.Tensor], steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        for p, g in zip(ps, grads(ps, t)):
            p.grad = g.to(p.dtype)
        opt.step()


# ----- the map and the coding --------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_the_map_is_the_papers(signed):
    library = torch.tensor(storage.dynamic_map(signed), dtype=torch.float64)
    torch.testing.assert_close(library, paper_map(signed), rtol=1e-15, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_coding_is_nearest_per_block_over_many_magnitudes(signed):
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.logspace(-12, 4, 6 * BLOCK + 100, dtype=torch.float64)
    sign = torch.randint(0, 2, magnitude.shape, generator=gen).double() * 2 - 1 if signed else 1.0
    x = magnitude[torch.randperm(magnitude.numel(), generator=gen)] * sign
    x[2 * BLOCK : 3 * BLOCK] = 0.0  # a block of zeros
    x[4 * BLOCK + 7] = 1e6  # one outlier: only its block loses resolution
    codes, absmax = storage.quantize(x, signed)
    ref_codes, ref_absmax = ref_encode(x, signed)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    decoded = storage.dequantize(codes, absmax, signed, torch.float64)
    assert torch.equal(decoded[2 * BLOCK : 3 * BLOCK], torch.zeros(BLOCK, dtype=torch.float64))
    scale = absmax.double().repeat_interleave(BLOCK)[: x.numel()]
    # the top decade: a relative error below 1/128 (signed) or 1/256 (unsigned) of the block maximum
    assert ((decoded - x).abs() / scale.clamp(min=1e-300)).max() <= (1 / 128 if signed else 1 / 256) * 0.91
    outlier_block = slice(4 * BLOCK, 5 * BLOCK)
    others = torch.ones(x.numel(), dtype=torch.bool)
    others[outlier_block] = False
    assert absmax[4] == 1e6 and (absmax[[0, 1, 3, 5, 6]] < 1e5).all()
    torch.testing.assert_close(decoded[others], ref_decode(ref_codes, ref_absmax, signed)[others], rtol=1e-15, atol=0)


def boundary_values(signed: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, midpoints): the map's decision boundaries in ``dtype``, each with its neighbours one ulp either
    side, the decades' edges with theirs, 0, the extremes, and values spread over twelve decades."""
    table = paper_map(signed)
    mids = ((table[1:] + table[:-1]) / 2).to(dtype)
    edges = torch.tensor([10.0**k for k in range(-9, 1)], dtype=dtype)
    points = torch.cat([mids, edges, -edges if signed else edges, torch.tensor([0.0, 1.0, 1e-30], dtype=dtype)])
    up, down = torch.full_like(points, 2.0), torch.full_like(points, -2.0)
    points = torch.cat([points, torch.nextafter(points, up), torch.nextafter(points, down)])
    gen = torch.Generator().manual_seed(1)
    spread = torch.logspace(-12, 0, 20000, dtype=torch.float64)
    spread = spread * (torch.randint(0, 2, spread.shape, generator=gen) * 2 - 1 if signed else 1)
    values = torch.cat([points, spread.to(dtype)])
    return values[(values.abs() <= 1) & ((values >= 0) | signed)], mids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [True, False])
def test_the_coder_of_compiled_steps_gives_the_codes_of_the_search(signed, dtype):
    """Compiled, the codes come from arithmetic (storage._arithmetic_codes), eagerly from a search of the
    boundaries (bucketize, which the test above holds to the nearest value): the same codes, eagerly and
    compiled, at every boundary and one ulp either side of it."""
    values, mids = boundary_values(signed, dtype)
    search = torch.bucketize(values, mids)
    assert torch.equal(storage._arithmetic_codes(values, signed, mids), search)
    if dtype == torch.float32:  # the fused paths compute in float32 (the update tests below run float64)
        compiled = torch.compile(storage._arithmetic_codes, fullgraph=True, dynamic=False)
        assert torch.equal(compiled(values, signed, mids), search)


# ----- the 8-bit update against float64 loops ----------------------------------------------------------------
def read(state: dict, name: str, signed: bool) -> torch.Tensor:
    """A moment of the reference: decoded where it is kept as (codes, scales), else as it is."""
    value = state[name]
    return ref_decode(*value, signed) if isinstance(value, tuple) else value


def write(state: dict, name: str, value: torch.Tensor, signed: bool, big: bool) -> None:
    state[name] = ref_encode(value, signed) if big else value


def ref_quantized_run(kind: str, ps: list[torch.Tensor], steps: int, hp: dict) -> tuple[list, list[dict]]:
    """The update of ``kind`` in float64 with each moment of a large tensor decoded before and encoded after the
    step (the paper's 8-bit optimizer), small tensors keeping float64 moments."""
    ws = [p.detach().clone() for p in ps]
    states = []
    for w in ws:
        zero = ref_encode(torch.zeros_like(w), True) if w.numel() >= 4096 else torch.zeros_like(w)
        states.append({"m": zero, "v": zero})
    lr, wd = hp["lr"], hp.get("weight_decay", 0.0)
    for t in range(1, steps + 1):
        for w, g, s in zip(ws, grads(ws, t - 1), states):
            big = w.numel() >= 4096
            if kind == "adamw":
                (b1, b2), eps = hp["betas"], hp["eps"]
                m = b1 * read(s, "m", True) + (1 - b1) * g
                v = b2 * read(s, "v", False) + (1 - b2) * g * g
                w.mul_(1 - lr * wd)
                w.sub_(lr / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + eps))
                write(s, "m", m, True, big)
                write(s, "v", v, False, big)
            elif kind == "lion":
                b1, b2 = hp["betas"]
                m = read(s, "m", True)
                w.mul_(1 - lr * wd)
                w.sub_(lr * torch.sign(b1 * m + (1 - b1) * g))
                write(s, "m", b2 * m + (1 - b2) * g, True, big)
            elif kind == "sgd":
                mu = hp["momentum"]
                m = g if t == 1 else mu * read(s, "m", True) + g
                w.sub_(lr * m)
                write(s, "m", m, True, big)
    return ws, states


CASES = {
    "adamw": (stochopt.AdamW, {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}),
    "lion": (stochopt.Lion, {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1}),
    "sgd": (stochopt.SGD, {"lr": 1e-2, "momentum": 0.9}),
}
STATE_NAMES = {"adamw": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg",), "sgd": ("momentum_buffer",)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", list(CASES))
def test_8bit_update_equals_a_float64_loop_that_quantizes(kind, path):
    cls, hp = CASES[kind]
    ps = params()
    opt = cls(ps, state_dtype="int8", **hp, **PATHS[path])
    train(opt, ps, STEPS)
    ws, ref_states = ref_quantized_run(kind, params(), STEPS, hp)
    for p, w, ref in zip(ps, ws, ref_states):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-10)
        state = opt.state[p]
        for name, ref_name in zip(STATE_NAMES[kind], ("m", "v")):
            if p.numel() < 4096:  # small tensors keep float moments
                assert state[name].dtype == torch.float64 and storage.absmax_name(name) not in state
                continue
            codes, scales = ref[ref_name]
            assert state[name].dtype == torch.uint8 and state[name].shape == p.shape
            assert torch.equal(state[name], codes), f"{name}: codes differ"
            assert torch.equal(state[storage.absmax_name(name)], scales)


def test_a_positive_second_moment_is_never_coded_as_zero():
    """Nearest rounding would code v below 1.6e-7 of its block's maximum as 0, while the first moment of the
    same gradients keeps values down to 5.5e-7 of its own: Adam's step m / (sqrt(v) + eps) would be lr * m / eps."""
    v = torch.tensor([1.0, 1e-9, 0.0] + [0.5] * 4093, dtype=torch.float64)
    codes, absmax = storage.quantize(v, signed=False)
    decoded = storage.dequantize(codes, absmax, False, torch.float64)
    assert decoded[1] == paper_map(False)[1] and decoded[2] == 0.0


def test_8bit_state_is_a_quarter_of_float32_and_the_layout_says_so():
    ps = params(dtype=torch.float32)
    opt = stochopt.AdamW(ps, lr=1e-3, state_dtype="int8")
    train(opt, ps, 1)
    layout = stored_layout(opt._layout(opt.param_groups[0]), opt.param_groups[0])
    for p in ps:
        measured = sum(t.nbytes for t in opt.state[p].values() if t.dim() > 0)
        assert measured == state_nbytes(tuple(s for s in layout if s.shape != "scalar"), p, "int8")
        if p.numel() >= 4096:
            assert measured == 2 * (p.numel() + 4 * math.ceil(p.numel() / BLOCK))


@pytest.mark.parametrize("path", ["loop", "fused"])
def test_8bit_resume_is_bit_exact(path):
    ps = params()  # float64: the fused kernel is the one the update test compiled
    opt = stochopt.AdamW(ps, lr=1e-2, state_dtype="int8", **PATHS[path])
    train(opt, ps, 30)
    resumed_ps = [p.detach().clone().requires_grad_() for p in ps]
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = stochopt.AdamW(resumed_ps, lr=1e-2, state_dtype="int8", **PATHS[path])
    resumed.load_state_dict(torch.load(buffer))
    train(opt, ps, 20, start=30)
    train(resumed, resumed_ps, 20, start=30)
    for a, b in zip(ps, resumed_ps):
        assert torch.equal(a, b)
    for a, b in zip(ps, resumed_ps):
        for name, value in opt.state[a].items():
            assert torch.equal(value, resumed.state[b][name]) and value.dtype == resumed.state[b][name].dtype


def test_float32_checkpoints_load_into_8bit_optimizers_and_back():
    ps = params(dtype=torch.float32)
    full = stochopt.AdamW(ps, lr=1e-2)
    train(full, ps, 10)
    lean_ps = [p.detach().clone().requires_grad_() for p in ps]
    lean = stochopt.AdamW(lean_ps, lr=1e-2, state_dtype="int8")
    lean.load_state_dict(full.state_dict())
    assert lean.param_groups[0]["state_dtype"] == "int8"
    big = lean_ps[0]
    codes, scales = ref_encode(full.state[ps[0]]["exp_avg"].double(), True)
    assert torch.equal(lean.state[big]["exp_avg"], codes) and torch.equal(lean.state[big]["exp_avg_absmax"], scales)
    train(lean, lean_ps, 5, start=10)  # it trains on
    back_ps = [p.detach().clone().requires_grad_() for p in lean_ps]
    back = stochopt.AdamW(back_ps, lr=1e-2)
    back.load_state_dict(lean.state_dict())
    decoded = storage.dequantize(lean.state[big]["exp_avg"], lean.state[big]["exp_avg_absmax"], True, torch.float32)
    assert back.state[back_ps[0]]["exp_avg"].dtype == torch.float32
    assert torch.equal(back.state[back_ps[0]]["exp_avg"], decoded)
    assert "exp_avg_absmax" not in back.state[back_ps[0]]
    train(back, back_ps, 5, start=15)


# ----- bfloat16 weights ----------------------------------------------------------------------------------------
def bf16_params(seed=0) -> list[torch.Tensor]:
    return params(shapes=((64, 80), (300,)), dtype=torch.bfloat16, seed=seed)


def ref_compensated_sgd(ps, steps, lr):
    """SGD on bfloat16 weights with a bfloat16 compensation buffer (Kahan): x = w + c in float32, the step on
    x, w = bf16(x), c = bf16(x - w)."""
    ws = [p.detach().clone() for p in ps]
    cs = [torch.zeros_like(w) for w in ws]
    for t in range(steps):
        for i, (w, g) in enumerate(zip(ws, grads(ws, t))):
            x = w.float() + cs[i].float()
            x.add_(g.to(torch.bfloat16).float(), alpha=-lr)
            ws[i] = x.to(torch.bfloat16)
            cs[i] = (x - ws[i].float()).to(torch.bfloat16)
    return ws, cs


@pytest.mark.parametrize("path", list(PATHS))
def test_compensated_bfloat16_weights_equal_a_kahan_loop(path):
    ps = bf16_params()
    opt = stochopt.SGD(ps, lr=1e-3, weight_rounding="compensated", **PATHS[path])
    train(opt, ps, STEPS)
    ws, cs = ref_compensated_sgd(bf16_params(), STEPS, 1e-3)
    for p, w, c in zip(ps, ws, cs):
        assert torch.equal(p.detach(), w)
        assert torch.equal(opt.state[p]["compensation"], c)


@pytest.mark.parametrize("path", [name for name in PATHS if name != "loop"])
def test_stochastic_rounding_is_the_same_in_every_path(path):
    def run(path_options, seed):
        ps = bf16_params()
        opt = stochopt.AdamW(ps, lr=1e-3, weight_rounding="stochastic", rounding_seed=seed, **path_options)
        train(opt, ps, 20)
        return ps

    reference = run(PATHS["loop"], 0)
    for a, b in zip(reference, run(PATHS[path], 0)):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(reference, run(PATHS[path], 1)))  # the seed matters


def test_stochastic_rounding_is_unbiased():
    # values between two bfloat16 neighbours: the mean over many independent roundings is the value
    lo = torch.tensor(1.0, dtype=torch.bfloat16).float()
    ulp = 2.0**-7
    x = lo + ulp * torch.linspace(0.05, 0.95, 19)
    draws = torch.stack([storage.stochastic_round(x.repeat(1000), salt).float().view(1000, -1) for salt in range(20)])
    mean = draws.mean(dim=(0, 1))
    # 20000 Bernoulli draws per value: the standard error of the mean is below ulp * 0.5 / sqrt(20000)
    assert ((mean - x).abs() < 5 * ulp * 0.5 / math.sqrt(20000)).all()
    assert set(draws.unique().tolist()) == {lo.item(), lo.item() + ulp}
    assert torch.equal(storage.stochastic_round(x, 7), storage.stochastic_round(x, 7))


def test_pure_bfloat16_loses_small_updates_and_the_remedies_keep_them():
    """The seeds' failure: an update below half an ulp of a bfloat16 weight (here 1e-4 against 1/256) rounds
    away every step, so 1000 steps of SGD leave the weight at 1. Stochastic rounding and compensation move it
    by the expected 0.1 (lr * steps)."""
    moved, carried = {}, 0.0
    for rounding in (None, "stochastic", "compensated"):
        w = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
        opt = stochopt.SGD([w], lr=1e-4, weight_rounding=rounding)
        for _ in range(1000):
            w.grad = -torch.ones_like(w)
            opt.step()
        moved[rounding] = w.detach().float().mean().item() - 1.0
        if rounding == "compensated":  # the weight and what its rounding lost
            carried = (w.detach().float() + opt.state[w]["compensation"].float()).mean().item() - 1.0
    assert moved[None] == 0.0
    # stochastic: per element a random walk of steps of an ulp (2**-7); the mean of 4096 is within 0.002
    assert abs(moved["stochastic"] - 0.1) < 0.002
    # compensated: the weight plus its bfloat16 compensation carry about 16 bits, so each step's update (1e-4
    # beside a weight of 1.1) is kept to about 2**-16 / 1e-4 of itself: a few percent here, not all of it
    assert abs(carried - 0.1) < 0.005
    assert abs(moved["compensated"] - carried) <= 2.0**-8  # the weight itself: within half an ulp of that


# ----- refusals --------------------------------------------------------------------------------------------------
def test_bad_storage_options_are_refused_by_name():
    p = torch.zeros(10, requires_grad=True)
    b = torch.zeros(10, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(TypeError, match="state_dtype must be .*'int8'.*got 'uint8'"):
        stochopt.AdamW([p], state_dtype="uint8")
    with pytest.raises(ValueError, match="Adafactor does not support state_dtype='int8'"):
        stochopt.Adafactor([p], state_dtype="int8")
    with pytest.raises(ValueError, match="Shampoo does not support state_dtype='int8'"):
        stochopt.Shampoo([p], state_dtype="int8")
    with pytest.raises(ValueError, match="weight_rounding must be one of .* got 'up'"):
        stochopt.AdamW([b], weight_rounding="up")
    with pytest.raises(ValueError, match=r"weight_rounding='stochastic' is for bfloat16 parameters; params\[0\]"):
        stochopt.AdamW([p], weight_rounding="stochastic")
    with pytest.raises(ValueError, match="computes in bfloat16"):
        stochopt.AdamW([b], weight_rounding="compensated", state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="rounding_seed must be a non-negative int, got -1"):
        stochopt.AdamW([b], weight_rounding="stochastic", rounding_seed=-1)
    with pytest.raises(ValueError, match="AdamWScheduleFree does not support weight_rounding"):
        stochopt.AdamWScheduleFree([b], weight_rounding="stochastic")
    emb = torch.nn.Embedding(5000, 4, sparse=True)
    opt = stochopt.LazyAdam(emb.parameters(), state_dtype="int8")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients .* state_dtype='int8'"):
        opt.step()


# ----- inside a step the user compiles ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, options",
    [
        (torch.float32, {"state_dtype": "int8"}),
        (torch.bfloat16, {"state_dtype": "int8", "weight_rounding": "compensated"}),
        (torch.bfloat16, {"weight_rounding": "stochastic"}),
    ],
    ids=["int8", "int8-compensated", "stochastic"],
)
def test_a_step_compiled_by_the_user_equals_the_eager_step(dtype, options):
    """opt.step traced by the user's torch.compile (tensor mode, the update inline in the user's graph)."""

    def run(compiled: bool) -> tuple[list[torch.Tensor], dict]:
        ps = params(shapes=((80, 64), (300,)), dtype=dtype)
        opt = stochopt.AdamW(ps, lr=1e-2, **options)
        step = torch.compile(opt.step) if compiled else opt.step
        for t in range(10):
            for p, g in zip(ps, grads(ps, t)):
                p.grad = g.to(dtype)
            step()
        return ps, opt.state[ps[0]]

    (eager, eager_state), (traced, traced_state) = run(False), run(True)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if "state_dtype" in options:
        differ = (eager_state["exp_avg"] != traced_state["exp_avg"]).float().mean().item()
        assert differ < 1e-3  # the coefficients are float64 tensors there, numbers here: a code may flip
    if options.get("weight_rounding") == "compensated":
        assert traced_state["compensation"].abs().max() > 0
        torch.testing.assert_close(eager_state["compensation"], traced_state["compensation"], rtol=0.02, atol=1e-4)
