"""``state_dtype`` and low-precision parameters, by value: AdamW, Lion and RAdam against loops written here that
keep the state in the engine's dtype and round where the engine rounds, over 100 steps, in every execution path.

What the engine computes (engine/layout.py ``compute_dtype_for``, engine/update.py ``apply_update``): the math
runs in ``promote_types(param dtype, state dtype)``; the state dtype (by default float32 for bfloat16/float16
parameters, else the parameter's dtype) is a storage format. A parameter or a state tensor of another dtype is
converted to the compute dtype, the update runs on those copies, and each is written back (``copy_``), rounded
to its own dtype once per step. So:

- float32 parameters, ``state_dtype=torch.bfloat16``: float32 math, on the stored (bfloat16) state read as
  float32; the new state is used unrounded in the step and rounded to bfloat16 when it is stored; the
  parameter stays float32 (the references: float32 lines, ``store`` = ``bf`` on the state).
- bfloat16 parameters, the default float32 state: float32 math on float32 state; the parameter is rounded to
  bfloat16 once per step, when it is written back.
- bfloat16 parameters, ``state_dtype=torch.bfloat16``: the math in bfloat16. In the eager paths (loop, foreach)
  every operation stores its result in bfloat16; each computes in float32 (torch's CPU kernels for bfloat16:
  the operands and a Python scalar are taken as float32; TensorList.mul_ passes its scalar so that the foreach
  kernel does too), so the reference computes each line in float32 and rounds it to bfloat16 (``bf``). Where a
  kernel rounds once for a product and a sum (``lerp``, ``addcmul``: a fused multiply-add) the reference does
  too (``fma``); ``Tensor.add(x, alpha=a)`` on bfloat16 tensors takes ``a`` as a bfloat16 number (Lion's step
  ``-lr``). The compiled kernel of the fused path (inductor) computes bfloat16 arithmetic in float32 and rounds
  only what it stores: its reference is the float32 one with every stored tensor rounded (see
  ``test_fused_path``); its coefficients are float32 (a bfloat16 tensor of them made beta2 = 0.999 1.0).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stochopt
from stochopt.engine import TensorList
from stochopt.engine.layout import LOW_PRECISION, compute_dtype_for, state_nbytes
from tests.conftest import PATHS, clone_params, make_params, run, set_grads

STEPS = 100
BF16 = torch.bfloat16
F32 = torch.float32
EAGER_PATHS = [name for name in PATHS if name not in ("fused", "capturable")]


def f32(x: float) -> float:
    """A Python float as the float32 number a kernel computing in float32 multiplies by."""
    return torch.tensor(x, dtype=torch.float32).item()


def bf(x: torch.Tensor) -> torch.Tensor:
    """A float32 result stored in bfloat16 (round to nearest even), back as float32 for the next line."""
    return x.to(BF16).float()


def same(x: torch.Tensor) -> torch.Tensor:
    return x


def rounding(dtype: torch.dtype):
    """What storing a float32 result in ``dtype`` does to it."""
    return bf if dtype == BF16 else same


def fma(a: torch.Tensor | float, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c rounded once to float32: the exact product and sum in float64 (a float32 product is exact there,
    and one more rounding to float32 is innocuous), as a fused multiply-add gives it."""
    a = a.double() if isinstance(a, torch.Tensor) else a
    return (a * b.double() + c.double()).float()


def lerp(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    """torch.lerp for a weight below 1/2: start + weight (end - start), the product and sum fused."""
    assert weight < 0.5
    return fma(f32(weight), end - start, start)


# ----- the references: one step of each, from the paper's equations, rounding where the engine rounds -------
# ``ops``: what each line's result is stored in (the compute dtype: ``bf`` for bfloat16 math, else ``same``);
# ``store``: what the state is stored in (the state dtype). A step takes the parameter and the gradient as
# float32 (exact: the compute dtype holds the parameter's), updates the state dict (float32 tensors holding the
# stored values), uses the new state unrounded, and returns the new parameter before its write-back, which the
# caller does (float32 params keep it as it is, bfloat16 ones round it).


def adamw_step(lr: float, betas: tuple[float, float], eps: float, wd: float, compute: torch.dtype, state: torch.dtype):
    b1, b2 = betas
    ops, store = rounding(compute), rounding(state)

    def step(t: int, q: torch.Tensor, g: torch.Tensor, st: dict) -> torch.Tensor:
        q = ops(q * f32(1 - lr * wd))
        m = ops(lerp(st["m"], g, 1 - b1))
        v = ops(st["v"] * f32(b2))
        v = ops(fma(f32(1 - b2) * g, g, v))  # addcmul: (value * g) * g + v, the last two fused
        st["m"], st["v"] = store(m), store(v)
        denom = ops(ops(ops(v.sqrt()) / f32((1 - b2**t) ** 0.5)) + f32(eps))
        return ops(q + f32(-lr / (1 - b1**t)) * m / denom)  # addcdiv: (value * m) / denom + q

    return step


def lion_step(lr: float, betas: tuple[float, float], wd: float, compute: torch.dtype, state: torch.dtype):
    b1, b2 = betas
    ops, store = rounding(compute), rounding(state)
    # add(u, alpha=-lr): bfloat16 tensors take alpha as a bfloat16 number, float32 ones as a float32 one
    neg_lr = torch.tensor(-lr, dtype=BF16).item() if compute == BF16 else f32(-lr)

    def step(t: int, q: torch.Tensor, g: torch.Tensor, st: dict) -> torch.Tensor:
        q = ops(q * f32(1 - lr * wd))
        u = ops(lerp(st["m"], g, 1 - b1)).sign()
        st["m"] = store(ops(lerp(st["m"], g, 1 - b2)))
        return ops(q + neg_lr * u)  # exact before the rounding: u is -1, 0 or 1

    return step


def radam_step(lr: float, betas: tuple[float, float], eps: float, compute: torch.dtype, state: torch.dtype):
    """RAdam (Liu et al., 2020) without weight decay; beta2 = 0.999 is the coefficient a bfloat16 tensor of
    coefficients rounded to 1.0."""
    b1, b2 = betas
    ops, store = rounding(compute), rounding(state)
    rho_inf = 2 / (1 - b2) - 1

    def step(t: int, q: torch.Tensor, g: torch.Tensor, st: dict) -> torch.Tensor:
        m = ops(lerp(st["m"], g, 1 - b1))
        v = ops(st["v"] * f32(b2))
        v = ops(fma(f32(1 - b2) * g, g, v))
        st["m"], st["v"] = store(m), store(v)
        rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho_t > 5:  # rectified: r_t sqrt(1 - b2^t) / (sqrt(v) + eps); before, momentum SGD (the engine: eps 1)
            r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            a, b, e = r * (1 - b2**t) ** 0.5, 0.0, eps
        else:
            a, b, e = 0.0, 1.0, 1.0
        scale = ops(ops(ops(ops(ops(v.sqrt()) + f32(e)).reciprocal()) * f32(a)) + f32(b))
        return ops(fma(f32(-lr / (1 - b1**t)) * m, scale, q))  # addcmul: (value * m) * scale + q

    return step


# Decay factors 1 - lr wd of 0.995 and 0.99, which bfloat16 arithmetic does not round away (0.999 would leave
# every parameter as it is: 1e-3 relative is below half a bfloat16 ulp); multiplying by 0.99 and by its bfloat16
# rounding 0.98828125 gives different results, so a path that rounds the scalar (the foreach kernel's mul_ on
# bfloat16 tensors) shows. RAdam: beta2 = 0.999, whose bfloat16 rounding is 1.0.
CASES = {
    "AdamW": (
        lambda ps, **kw: stochopt.AdamW(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.5, **kw),
        lambda compute, state: adamw_step(1e-2, (0.9, 0.99), 1e-6, 0.5, compute, state),
        {"m": "exp_avg", "v": "exp_avg_sq"},
    ),
    "Lion": (
        lambda ps, **kw: stochopt.Lion(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=1.0, **kw),
        lambda compute, state: lion_step(1e-2, (0.9, 0.99), 1.0, compute, state),
        {"m": "exp_avg"},
    ),
    "RAdam": (
        lambda ps, **kw: stochopt.RAdam(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, **kw),
        lambda compute, state: radam_step(1e-2, (0.9, 0.999), 1e-6, compute, state),
        {"m": "exp_avg", "v": "exp_avg_sq"},
    ),
}

# (param dtype, state_dtype option) -> the dtypes the engine computes and stores the state in
PRECISIONS = {
    "float32-params-bfloat16-state": (F32, BF16),
    "bfloat16-params-float32-state": (BF16, None),
    "bfloat16-params-bfloat16-state": (BF16, BF16),
}


def dtypes(precision: str) -> tuple[torch.dtype, torch.dtype | None, torch.dtype, torch.dtype]:
    """(param dtype, state_dtype option, compute dtype, stored state dtype)"""
    param_dtype, option = PRECISIONS[precision]
    state = option if option is not None else (F32 if param_dtype in LOW_PRECISION else param_dtype)
    return param_dtype, option, torch.promote_types(param_dtype, state), state


def reference_run(params: list[torch.Tensor], step, names: dict, steps: int = STEPS) -> list[dict]:
    """The reference's own trajectory from zero state, on detached copies of the parameters."""
    states = [{k: torch.zeros(p.shape) for k in names} for p in params]
    for t in range(1, steps + 1):
        set_grads(params, t - 1)
        with torch.no_grad():
            for p, st in zip(params, states):
                p.copy_(step(t, p.float(), p.grad.float(), st))
    return states


def differing(x: torch.Tensor, y: torch.Tensor) -> str:
    x, y = x.detach().float(), y.detach().float()
    return f"{int((x != y).sum())} of {x.numel()} elements differ, by up to {float((x - y).abs().max()):.3g}"


def assert_bit_exact(opt, params, ref_params, ref_states, names, state_dtype) -> None:
    """The parameters and every state tensor, bit for bit."""
    for p, q, st in zip(params, ref_params, ref_states):
        shape = tuple(p.shape)
        assert torch.equal(p.detach(), q.detach()), f"param {shape}: {differing(p, q)}"
        for ref_name, name in names.items():
            state = opt.state[p][name]
            assert state.dtype == state_dtype
            assert torch.equal(state.float(), st[ref_name]), f"{name} {shape}: {differing(state, st[ref_name])}"


def check_eager_path(name: str, path_name: str, precision: str) -> None:
    """100 steps of ``name`` in an eager path against its reference's own trajectory, bit for bit."""
    make, step, names = CASES[name]
    param_dtype, option, compute, state = dtypes(precision)
    params = make_params(dtype=param_dtype)
    ref_params = clone_params(params)
    opt = make(params, state_dtype=option, **PATHS[path_name])
    run(opt, params, STEPS)
    ref_states = reference_run(ref_params, step(compute, state), names)
    assert all(p.dtype == param_dtype for p in params)
    assert_bit_exact(opt, params, ref_params, ref_states, names, state)


@pytest.mark.parametrize("path_name", EAGER_PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_state_of_float32_params(name: str, path_name: str) -> None:
    """float32 params and math; the state read from bfloat16 and rounded to it once per step. The fused path:
    ``test_fused_path``."""
    check_eager_path(name, path_name, "float32-params-bfloat16-state")


@pytest.mark.parametrize("path_name", EAGER_PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_params_with_float32_state(name: str, path_name: str) -> None:
    """float32 math and state, the parameter rounded to bfloat16 at each write-back."""
    check_eager_path(name, path_name, "bfloat16-params-float32-state")


@pytest.mark.parametrize("path_name", EAGER_PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_params_with_bfloat16_state(name: str, path_name: str) -> None:
    """bfloat16 math: every operation's result rounded to bfloat16. The foreach and default paths failed here
    before TensorList.mul_ passed its scalar unrounded (see test_tensorlist_scalars_are_not_rounded)."""
    check_eager_path(name, path_name, "bfloat16-params-bfloat16-state")


# Lion's direction is a sign: where m's interpolation with g is 0 to float32 rounding, two orders of the same
# arithmetic can give it different signs, and the parameter then differs by lr (besides its rounding)
SIGN_FLIP = {"AdamW": 0.0, "Lion": 1e-2, "RAdam": 0.0}


# capturable runs the fused path's kernel with coefficients computed as tensors: one precision suffices for it
KERNEL_PATHS = [(precision, "fused") for precision in PRECISIONS] + [("bfloat16-params-float32-state", "capturable")]


@pytest.mark.parametrize("precision,path_name", KERNEL_PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_fused_path(name: str, precision: str, path_name: str) -> None:
    """The fused path (and capturable, the same kernel in tensor mode), step by step from the optimizer's own
    state, 100 steps.

    The one-element tensor runs the same code uncompiled: bit for bit against the eager reference. The others
    run the compiled kernel, which computes in float32 even where the compute dtype is bfloat16
    (inductor upcasts bfloat16 loads and rounds only its stores), so its reference is the float32 one with
    every stored tensor rounded to its dtype. The kernel orders and fuses the float32 arithmetic its own way (where
    to fuse a multiply-add, for one), so its float32 results differ from the reference's by a few float32 ulps of
    the operands: measured up to 1.0 eps (|m| + |g|) for m and 1.0 eps (v + g^2) for v (allowed: 4 eps (|m| +
    |m_prev| + |g|) and 4 eps (v + v_prev + g^2)), up to 9.4 eps (|q| + |q_prev|) for a float32 parameter, where
    the interpolation of m cancels (allowed: 32 eps (|q| + |q_prev|)). A value that close to a boundary between
    two bfloat16 numbers is stored as the other one: one bfloat16 ulp more, at most eps_bf16 max(|x|, |y|) (plus
    SIGN_FLIP for a parameter). That is rare (measured: at most 30 elements of the 76800 in a step, Lion's m in
    bfloat16 math, and 11 of its parameters, sign flips; elsewhere 3 or fewer; allowed: 1e-3 of the elements per
    step, and one element of the small tensors).

    With bfloat16 parameters and bfloat16 state AdamW takes torch's own fused kernel (``_native_fused``, the
    state of the parameter's dtype), which computes in float32 and rounds what it stores as the compiled kernel
    does: the same reference, with the same allowance, for every tensor. Before the coefficients were float32,
    the compiled kernel of bfloat16 math multiplied by a bfloat16 tensor of them (RAdam's beta2 = 0.999 -> 1.0,
    Lion's decay 0.99 -> 0.98828125): a fifth and more of the elements differed in every step."""
    make, step_for, names = CASES[name]
    param_dtype, option, compute, state_dtype = dtypes(precision)
    params = make_params(dtype=param_dtype)
    opt = make(params, state_dtype=option, **PATHS[path_name])
    native = opt._native_fused is not None and option == param_dtype
    eager_step, compiled_step = step_for(compute, state_dtype), step_for(F32, state_dtype)
    eps = torch.finfo(F32).eps
    for t in range(1, STEPS + 1):
        set_grads(params, t - 1)
        expected = []
        for p in params:
            # copies: .float() of a float32 tensor is the tensor itself, which the step changes
            st = {
                k: opt.state[p][n].float().clone() if opt.state[p] else torch.zeros(p.shape) for k, n in names.items()
            }
            prev = {k: x.clone() for k, x in st.items()}
            q, g = p.detach().float().clone(), p.grad.float()
            exact = p.numel() < 2 and not native
            new_q = (eager_step if exact else compiled_step)(t, q, g, st)
            expected.append((new_q.to(param_dtype).float(), st, prev, q, g, exact))
        opt.step()
        for p, (q, st, prev, q_prev, g, exact) in zip(params, expected):
            where = f"step {t}, {tuple(p.shape)}"
            x = p.detach().float()
            if exact:
                assert torch.equal(x, q), f"{where}, param: {differing(x, q)}"
                for k, n in names.items():
                    assert torch.equal(opt.state[p][n].float(), st[k]), f"{where}, {n}"
                continue
            float32_bound = 32 * eps * (q.abs() + q_prev.abs())
            assert_close_stored(x, q, param_dtype, float32_bound, SIGN_FLIP[name], f"{where}, param")
            for k, n in names.items():
                float32_bound = 4 * eps * (st[k].abs() + prev[k].abs() + (g.abs() if k == "m" else g * g))
                assert_close_stored(opt.state[p][n].float(), st[k], state_dtype, float32_bound, 0.0, f"{where}, {n}")


def assert_close_stored(x, y, dtype, float32_bound, flip, where) -> None:
    """x (stored in ``dtype``) against y: float32 within ``float32_bound``; bfloat16 equal but for the rare
    values whose float32 error crossed a rounding boundary: those by the float32 error and one bfloat16 ulp."""
    off = (x - y).abs()
    if dtype == F32:
        assert bool((off <= float32_bound + flip).all()), f"{where}: {differing(x, y)}"
        return
    eps_bf16 = torch.finfo(BF16).eps
    # rare per element: 1e-3 of a tensor's elements per step, and one element of a small tensor
    assert int((off != 0).sum()) <= max(1.0, 1e-3 * x.numel()), f"{where}: {differing(x, y)}"
    ulp = eps_bf16 * torch.maximum(x.abs(), y.abs())  # a bfloat16 ulp of the larger of the two, at most
    assert bool((off <= float32_bound + ulp + flip).all()), f"{where}: {differing(x, y)}"


# ----- the engine's pieces, directly -------------------------------------------------------------------------
SCALARS = [0.999, 0.99, 0.995, 0.9, 1e-3, 1.0 - 1e-8, 3.3e-5, 0.1234567, 2.5, 123.456, 7]


def _lists(dtype: torch.dtype) -> tuple[list[torch.Tensor], ...]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 256), (7, 5), (11,)]
    a, b, c = ([torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(3))
    return a, b, [x.abs() + 0.5 for x in c]


# name -> (the TensorList method, the Tensor method), each with a scalar s; b and c are the other operands
SCALAR_METHODS = {
    "mul_": (lambda a, b, c, s: a.mul_(s), lambda a, b, c, s: a.mul_(s)),
    "div_": (lambda a, b, c, s: a.div_(s), lambda a, b, c, s: a.div_(s)),
    "add_": (lambda a, b, c, s: a.add_(s), lambda a, b, c, s: a.add_(s)),
    "sub_": (lambda a, b, c, s: a.sub_(s), lambda a, b, c, s: a.sub_(s)),
    "add_alpha": (lambda a, b, c, s: a.add_(b, alpha=s), lambda a, b, c, s: a.add_(b, alpha=s)),
    "sub_alpha": (lambda a, b, c, s: a.sub_(b, alpha=s), lambda a, b, c, s: a.sub_(b, alpha=s)),
    "clamp_": (lambda a, b, c, s: a.clamp_(-s, s), lambda a, b, c, s: a.clamp_(-s, s)),
    "lerp_": (lambda a, b, c, s: a.lerp_(b, s), lambda a, b, c, s: a.lerp_(b, s)),
    "addcmul_": (lambda a, b, c, s: a.addcmul_(b, c, value=s), lambda a, b, c, s: a.addcmul_(b, c, value=s)),
    "addcdiv_": (lambda a, b, c, s: a.addcdiv_(b, c, value=s), lambda a, b, c, s: a.addcdiv_(b, c, value=s)),
    "mul": (lambda a, b, c, s: a.mul(s), lambda a, b, c, s: a.mul(s)),
    "div": (lambda a, b, c, s: a.div(s), lambda a, b, c, s: a.div(s)),
    "add": (lambda a, b, c, s: a.add(s), lambda a, b, c, s: a.add(s)),
    "sub": (lambda a, b, c, s: a.sub(s), lambda a, b, c, s: a.sub(s)),
    "clamp": (lambda a, b, c, s: a.clamp(-s, s), lambda a, b, c, s: a.clamp(-s, s)),
    "lerp": (lambda a, b, c, s: a.lerp(b, s), lambda a, b, c, s: a.lerp(b, s)),
    "addcmul": (lambda a, b, c, s: a.addcmul(b, c, value=s), lambda a, b, c, s: a.addcmul(b, c, value=s)),
}


@pytest.mark.parametrize("dtype", [BF16, torch.float16, F32, torch.float64], ids=str)
@pytest.mark.parametrize("method", list(SCALAR_METHODS))
def test_tensorlist_scalars_are_not_rounded(method: str, dtype: torch.dtype) -> None:
    """Every TensorList method that takes a Python scalar gives Tensor's result bit for bit. On bfloat16 and
    float16 tensors, torch._foreach_mul_ (torch 2.13, CPU) rounds a Python scalar to the tensors' dtype (0.999 ->
    1.0, 0.99 -> 0.98828125) where Tensor.mul_ takes it at float32: TensorList.mul_ failed here before it passed
    the scalar as a float32 0-d tensor (a list of scalars: tensor by tensor)."""
    ours, theirs = SCALAR_METHODS[method]
    if method.startswith("lerp"):
        scalars = [s for s in SCALARS if s <= 1]
    else:
        scalars = SCALARS
    for s in scalars:
        a, b, c = _lists(dtype)
        out = ours(TensorList(a), TensorList(b), TensorList(c), s)
        for i, (x, y, z) in enumerate(zip(*_lists(dtype))):
            expected = theirs(x, y, z, s)
            got = out.tensors[i]
            assert got.dtype == dtype and torch.equal(got, expected), f"{method}({s}) on {tuple(x.shape)}"
        if method.endswith("_"):
            assert out.tensors[0] is a[0]  # in place


@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=str)
def test_tensorlist_mul_takes_one_scalar_per_tensor_unrounded(dtype: torch.dtype) -> None:
    a, _, _ = _lists(dtype)
    scalars = [0.99, 0.999, 0.995]
    TensorList(a).mul_(scalars)
    for x, y, s in zip(a, _lists(dtype)[0], scalars):
        assert torch.equal(x, y.mul_(s))


def test_compute_dtype_is_the_promotion_of_param_and_state_dtypes() -> None:
    f16 = torch.float16
    cases = [
        (F32, BF16, F32), (F32, None, F32), (BF16, None, F32), (BF16, BF16, BF16), (f16, None, F32),
        (f16, BF16, F32), (f16, f16, f16), (torch.float64, F32, torch.float64), (F32, torch.float64, torch.float64),
    ]  # fmt: skip
    for param_dtype, option, compute in cases:
        assert compute_dtype_for(torch.empty(2, dtype=param_dtype), option) == compute, (param_dtype, option)


@pytest.mark.parametrize("path_name", list(PATHS))
def test_bfloat16_state_keeps_its_bytes(path_name: str) -> None:
    """The float32 copies of the round trip do not stay: the state is bfloat16, as the layout (the memory
    estimator's source) says, and the parameters stay float32."""
    params = make_params(dtype=F32)
    opt = stochopt.AdamW(params, state_dtype=BF16, **PATHS[path_name])
    run(opt, params, 2)
    layout = opt._layout(opt.param_groups[0])
    for p in params:
        held = sum(t.numel() * t.element_size() for t in opt.state[p].values())
        assert held == state_nbytes(layout, p, BF16) == 4 + 2 * 2 * p.numel()  # step, m and v
        assert p.dtype == F32 and all(t.dtype == BF16 for k, t in opt.state[p].items() if k != "step")


def test_adafisher_kronecker_state_is_rounded_storage() -> None:
    """AdaFisher's own step loop (its Kronecker group) follows the engine's rule: float32 params with bfloat16
    state equal, bit for bit, a float32-state AdaFisher whose state is rounded to bfloat16 after every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    ref_model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    ref_model.load_state_dict(model.state_dict())
    opt = stochopt.AdaFisher(model, lr=1e-2, weight_decay=0.1, state_dtype=BF16)
    ref = stochopt.AdaFisher(ref_model, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        with torch.no_grad():
            for state in ref.state.values():
                for key, value in state.items():
                    if key != "step":
                        value.copy_(bf(value))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert p.dtype == F32 and torch.equal(p, q)
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == BF16 and torch.equal(value.float(), ref.state[q][key]), key


def test_foreach_round_trip_runs_in_bounded_calls(monkeypatch) -> None:
    """A multi-tensor call that converts state is cut into calls of at most ROUND_TRIP_NUMEL elements (a larger
    tensor alone), so that the float32 copies of bfloat16 state stay small; the result is the same, bit for bit."""
    from stochopt.engine import optimizer as engine

    calls = []

    def counting(update, p, *args):
        calls.append([t.numel() for t in p.tensors] if isinstance(p, TensorList) else [p.numel()])
        return apply_update(update, p, *args)

    apply_update = engine.apply_update
    monkeypatch.setattr(engine, "apply_update", counting)
    monkeypatch.setattr(engine, "ROUND_TRIP_NUMEL", 40)
    check_eager_path("AdamW", "foreach", "float32-params-bfloat16-state")
    # one step: the matrices (300, 256), (7, 5), (3, 4, 2) in calls of their own; the vectors (11,), (1,) together
    assert calls[:4] == [[76800], [35], [24], [11, 1]]
