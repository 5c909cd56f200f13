"""Every TensorList operation against the same Tensor operation applied tensor by tensor, with every kind of
operand an update function may pass (another list, a number, a 0-d tensor, one number per tensor) and alpha."""

from __future__ import annotations

import inspect

import pytest
import torch

from stochopt.engine import TensorList

SHAPES = [(3, 4), (5,), (2, 1, 3)]


def tensors(seed: int, positive: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    return [t.abs() + 0.1 for t in ts] if positive else ts


# operand builders: a fresh value for the TensorList call and the matching value for tensor i
OTHER = {
    "list": (lambda: TensorList(tensors(1, positive=True)), lambda i: tensors(1, positive=True)[i]),
    "number": (lambda: 0.7, lambda i: 0.7),
    "0-d tensor": (lambda: torch.tensor(1.3, dtype=torch.float64), lambda i: torch.tensor(1.3, dtype=torch.float64)),
}
PER_TENSOR = (lambda: [0.5, -2.0, 3.0], lambda i: [0.5, -2.0, 3.0][i])

# method -> the operand kinds it takes and its keyword arguments
BINARY = {
    "add": (["list", "number", "0-d tensor", "per tensor"], [{}, {"alpha": -2.5}]),
    "sub": (["list", "number", "0-d tensor", "per tensor"], [{}, {"alpha": 0.25}]),
    "mul": (["list", "number", "0-d tensor", "per tensor"], [{}]),
    "div": (["list", "number", "0-d tensor", "per tensor"], [{}]),
    "maximum": (["list"], [{}]),
    "copy": (["list"], [{}]),
}
UNARY = {
    "sqrt": {},
    "neg": {},
    "reciprocal": {},
    "rsqrt": {},
    "sign": {},
    "clone": {},
    "clamp": {"min": 0.2, "max": 0.9},
    "clamp_min": {"min": 0.5},
    "clamp_max": {"max": 0.5},
    "mean": {"dim": -1, "keepdim": True},
    "to": {"dtype": torch.float32},
}
TERNARY = {"addcmul": [{}, {"value": -0.3}], "addcdiv": [{}, {"value": 2.0}]}
REDUCTIONS = {"norm": lambda t: torch.linalg.vector_norm(t), "rms": lambda t: t.square().mean().sqrt()}


def operand(kind: str):
    return PER_TENSOR if kind == "per tensor" else OTHER[kind]


def variants(name: str) -> list[str]:
    """The spellings of one operation that TensorList has: out-of-place, in-place, or both."""
    return [n for n in (name, name + "_") if hasattr(TensorList, n)]


#: TensorList methods whose Tensor counterpart is spelled differently
TENSOR_SPELLING = {"maximum_": lambda t, other: t.copy_(torch.maximum(t, other))}


def check(method: str, make_args, make_tensor_args, kwargs: dict) -> None:
    base, inplace = tensors(0, positive=True), method.endswith("_")
    tl = TensorList([t.clone() for t in base])
    result = getattr(tl, method)(*make_args(), **kwargs)
    spelled = TENSOR_SPELLING.get(method)
    expected = [
        spelled(t.clone(), *make_tensor_args(i))
        if spelled
        else getattr(t.clone(), method)(*make_tensor_args(i), **kwargs)
        for i, t in enumerate(base)
    ]
    assert isinstance(result, TensorList) and len(result) == len(base)
    if inplace:
        assert result is tl, f"{method} must return the list it changed"
    for got, want in zip(result.tensors, expected):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


CASES = [
    pytest.param(m, kind, kw, id=f"{m}-{kind}-{kw}")
    for name, (kinds, kws) in BINARY.items()
    for m in variants(name)
    for kind in kinds
    for kw in kws
]


@pytest.mark.parametrize("method, kind, kwargs", CASES)
def test_binary_operations_equal_the_tensor_ones(method: str, kind: str, kwargs: dict) -> None:
    make, make_i = operand(kind)
    check(method, lambda: (make(),), lambda i: (make_i(i),), kwargs)


@pytest.mark.parametrize("method", [m for name in UNARY for m in variants(name)])
def test_unary_operations_equal_the_tensor_ones(method: str) -> None:
    check(method, tuple, lambda i: (), UNARY[method.rstrip("_")])


@pytest.mark.parametrize(
    "method, kwargs", [(m, kw) for name, kws in TERNARY.items() for m in variants(name) for kw in kws]
)
def test_pointwise_products_equal_the_tensor_ones(method: str, kwargs: dict) -> None:
    a, b = tensors(2), tensors(3, positive=True)
    check(method, lambda: (TensorList(a), TensorList(b)), lambda i: (a[i], b[i]), kwargs)


@pytest.mark.parametrize("method", [m for m in variants("lerp")])
@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_lerp_equals_the_tensor_one(method: str, weight: float) -> None:
    end = tensors(4)
    check(method, lambda: (TensorList(end), weight), lambda i: (end[i], weight), {})


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_reductions_equal_the_tensor_ones(name: str) -> None:
    base = tensors(5)
    got = getattr(TensorList(base), name)()
    for value, t in zip(got.tensors, base):
        torch.testing.assert_close(value, REDUCTIONS[name](t), rtol=1e-14, atol=0)


def test_operators_and_reflected_operators() -> None:
    a, b = tensors(6), tensors(7, positive=True)
    x, y = TensorList(a), TensorList(b)
    pairs = [(x + y, [p + q for p, q in zip(a, b)]), (x - y, [p - q for p, q in zip(a, b)]),
             (x * y, [p * q for p, q in zip(a, b)]), (x / y, [p / q for p, q in zip(a, b)]),
             (-x, [-p for p in a]), (2.0 + x, [2.0 + p for p in a]), (3.0 * x, [3.0 * p for p in a])]  # fmt: skip
    for got, want in pairs:
        for g, w in zip(got.tensors, want):
            torch.testing.assert_close(g, w, rtol=1e-14, atol=0)


def test_every_public_operation_is_tested_here() -> None:
    tested = {m for name in [*BINARY, *UNARY, *TERNARY, "lerp"] for m in variants(name)} | set(REDUCTIONS)
    tested |= {"dtype", "tensors"}
    public = {n for n, _ in inspect.getmembers(TensorList) if not n.startswith("_")}
    assert public - tested == set(), "add the new TensorList operations to this file's tables"
