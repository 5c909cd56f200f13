"""A list of tensors that answers the Tensor methods an update function uses with torch's ``_foreach`` kernels.

An optimizer's update function is written once against the ordinary Tensor API (``m.lerp_(g, w)``,
``v.mul_(b).addcmul_(g, g, value=c)``). Given plain tensors it runs per tensor (the loop path and, under
``torch.compile``, the fused path); given ``TensorList`` arguments the same lines run as multi-tensor
``_foreach`` calls (the foreach path). Only the methods update functions need are here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

#: dtypes whose arithmetic torch runs at float32 (opmath), a Python scalar included
_REDUCED = (torch.bfloat16, torch.float16)


def _arg(other: Any) -> Any:
    return other.tensors if isinstance(other, TensorList) else other


def _scaled(other: Any, alpha: float) -> Any:
    """A scalar operand (a number, a 0-d tensor, or one number per tensor) times ``alpha``: torch's
    ``add(t, s, alpha=a)`` is ``t + a * s``, and the foreach kernels take no ``alpha`` beside a scalar."""
    if alpha == 1:
        return other
    if isinstance(other, (list, tuple)):
        return [x * alpha for x in other]
    return other * alpha


class TensorList:
    """Tensors of one device and dtype, operated on together."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        self.tensors: list[Tensor] = list(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    # out-of-place arithmetic
    def add(self, other: Any, *, alpha: float = 1) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_add(self.tensors, other.tensors, alpha=alpha))
        return TensorList(torch._foreach_add(self.tensors, _scaled(other, alpha)))

    def sub(self, other: Any, *, alpha: float = 1) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_sub(self.tensors, other.tensors, alpha=alpha))
        return TensorList(torch._foreach_sub(self.tensors, _scaled(other, alpha)))

    def mul(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_mul(self.tensors, _arg(other)))

    def div(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_div(self.tensors, _arg(other)))

    def sqrt(self) -> TensorList:
        return TensorList(torch._foreach_sqrt(self.tensors))

    def neg(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.tensors))

    def reciprocal(self) -> TensorList:
        return TensorList(torch._foreach_reciprocal(self.tensors))

    def clamp(self, min: float | None = None, max: float | None = None) -> TensorList:  # noqa: A002
        return self.clone().clamp_(min, max)

    def addcmul(self, t1: TensorList, t2: TensorList, *, value: float = 1) -> TensorList:
        return TensorList(torch._foreach_addcmul(self.tensors, t1.tensors, t2.tensors, value=value))

    def lerp(self, end: TensorList, weight: float) -> TensorList:
        return TensorList(torch._foreach_lerp(self.tensors, end.tensors, weight))

    # No foreach kernels exist for these; Adafactor's row and column statistics take them tensor by tensor.

    def mean(self, dim: int, keepdim: bool = False) -> TensorList:
        return TensorList(t.mean(dim=dim, keepdim=keepdim) for t in self.tensors)

    def rsqrt(self) -> TensorList:
        return TensorList(torch._foreach_rsqrt(self.tensors))

    def rms(self) -> TensorList:
        """Root mean square of each tensor, as 0-d tensors."""
        return TensorList(n / t.numel() ** 0.5 for n, t in zip(torch._foreach_norm(self.tensors), self.tensors))

    def norm(self) -> TensorList:
        """The L2 norm of each tensor, as 0-d tensors."""
        return TensorList(torch._foreach_norm(self.tensors))

    def clone(self) -> TensorList:
        return TensorList(t.clone() for t in self.tensors)

    def to(self, dtype: torch.dtype) -> TensorList:
        return TensorList(t.to(dtype) for t in self.tensors)

    # in-place arithmetic
    def add_(self, other: Any, *, alpha: float = 1) -> TensorList:
        if isinstance(other, TensorList):
            torch._foreach_add_(self.tensors, other.tensors, alpha=alpha)
        else:
            torch._foreach_add_(self.tensors, _scaled(other, alpha))
        return self

    def sub_(self, other: Any, *, alpha: float = 1) -> TensorList:
        if isinstance(other, TensorList):
            torch._foreach_sub_(self.tensors, other.tensors, alpha=alpha)
        else:
            torch._foreach_sub_(self.tensors, _scaled(other, alpha))
        return self

    def mul_(self, other: Any) -> TensorList:
        # torch 2.13 (CPU): _foreach_mul_ rounds a Python scalar, or a list of them, to bfloat16/float16 first
        # (0.999 -> 1.0, 0.99 -> 0.98828125) where Tensor.mul_ and every other foreach op here take it at float32.
        # A float32 0-d CPU tensor it does not round (the CPU kernel multiplies at float32, CUDA's reads the
        # number); a list goes tensor by tensor. Measured bit for bit against Tensor.mul_: tests/optim/
        # test_state_dtype.py.
        if self.tensors and self.tensors[0].dtype in _REDUCED and not isinstance(other, (TensorList, Tensor)):
            if isinstance(other, (list, tuple)):
                for t, x in zip(self.tensors, other, strict=True):
                    t.mul_(x)
                return self
            if isinstance(other, (int, float)) and not isinstance(other, bool):
                other = torch.tensor(float(other), dtype=torch.float32)
        torch._foreach_mul_(self.tensors, _arg(other))
        return self

    def div_(self, other: Any) -> TensorList:
        torch._foreach_div_(self.tensors, _arg(other))
        return self

    def sqrt_(self) -> TensorList:
        torch._foreach_sqrt_(self.tensors)
        return self

    def reciprocal_(self) -> TensorList:
        torch._foreach_reciprocal_(self.tensors)
        return self

    def sign_(self) -> TensorList:
        torch._foreach_sign_(self.tensors)
        return self

    def maximum_(self, other: TensorList) -> TensorList:
        torch._foreach_maximum_(self.tensors, other.tensors)
        return self

    def clamp_(self, min: float | None = None, max: float | None = None) -> TensorList:  # noqa: A002
        if min is not None:
            torch._foreach_clamp_min_(self.tensors, min)
        if max is not None:
            torch._foreach_clamp_max_(self.tensors, max)
        return self

    def lerp_(self, end: TensorList, weight: float) -> TensorList:
        torch._foreach_lerp_(self.tensors, end.tensors, weight)
        return self

    def addcmul_(self, t1: TensorList, t2: TensorList, *, value: float = 1) -> TensorList:
        torch._foreach_addcmul_(self.tensors, t1.tensors, t2.tensors, value=value)
        return self

    def addcdiv_(self, t1: TensorList, t2: TensorList, *, value: float = 1) -> TensorList:
        torch._foreach_addcdiv_(self.tensors, t1.tensors, t2.tensors, value=value)
        return self

    def copy_(self, src: TensorList) -> TensorList:
        torch._foreach_copy_(self.tensors, src.tensors)
        return self

    __add__ = add
    __sub__ = sub
    __mul__ = mul
    __truediv__ = div
    __neg__ = neg

    def __radd__(self, other: float) -> TensorList:
        return self.add(other)

    def __rmul__(self, other: float) -> TensorList:
        return self.mul(other)
