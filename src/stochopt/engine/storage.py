r"""How state and weights are stored between steps: 8-bit block-wise quantized moments, and bfloat16 weights
updated with stochastic rounding or a compensation buffer instead of a float32 master copy.

**8-bit state** (``state_dtype="int8"``; Dettmers et al., 2022, arXiv 2110.02861). A moment declared
quantizable in its optimizer's layout (``StateSpec(quantize="signed" | "unsigned")``) is stored as one byte per
value, an index into a 256-value *dynamic* map, with one float32 scale per block of ``BLOCK`` = 2048 values
(the block's absolute maximum, ``<name>_absmax``): value = map[code] * absmax. The dynamic map (the paper's
dynamic tree quantization, section 2) spends its codes on magnitudes spread over seven decades: for decimal
exponent e = -6 ... 0 it holds the midpoints of 2^e (signed, each sign) or 2^(e+1) (unsigned) equal steps of
[0.1, 1] * 10^e, and 0 and 1. First moments use the signed map, second moments (non-negative) the unsigned one,
which has twice the resolution. A value is coded as the nearest map entry of value / absmax (a positive value
of the unsigned map at least as its smallest positive entry: see ``quantize``), so the relative
error of a block's largest values is below half a step of the map's top decade (1/256 unsigned, 1/128
signed) and every block keeps its own range, so one outlier costs only its block. Tensors of fewer than
``MIN_NUMEL`` = 4096 values keep float32 moments (the paper's rule: they are few bytes and often sensitive).
Quantization runs inside the update (engine/update.py ``apply_update``): the codes are read and decoded, the
update computes in float32, and the new moments are encoded and written back; in the fused path this is
one compiled kernel, so what a step moves for a moment is one byte a value (plus a scale per 2048).

**bfloat16 weights** (``weight_rounding``). A bfloat16 weight rounded to nearest loses every update below half
an ulp (1/512 of the weight's magnitude): a small learning rate then does nothing. Two remedies without a
float32 master (4 bytes a parameter):

- ``"stochastic"``: the float32 result is rounded up or down to a neighbouring bfloat16 with probabilities
  that make the rounding unbiased (E[round(x)] = x), by adding 16 uniform random bits below the bfloat16
  mantissa and truncating. The bits come from a counter-based hash of (``rounding_seed``, the parameter's
  index, its step, the element's index): reproducible from the seed, the same in every execution path, and
  no generator state to checkpoint.
- ``"compensated"``: Kahan summation in bfloat16. A bfloat16 ``compensation`` buffer (2 bytes a parameter)
  holds what the rounding of the weight lost; the update is applied to weight + compensation in float32, and
  the new rounding error is stored again, so the weight plus its compensation carries about 16 significant
  bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: values per quantization block (one float32 scale each)
BLOCK = 2048
#: tensors with fewer values keep float32 moments
MIN_NUMEL = 4096
#: the ``state_dtype`` that selects 8-bit state
INT8 = "int8"
WEIGHT_ROUNDINGS = (None, "nearest", "stochastic", "compensated")
_MASK32 = 0xFFFFFFFF


def quantized_param(param: Tensor) -> bool:
    """The moments of ``param`` are stored as 8-bit codes under ``state_dtype="int8"``."""
    return param.numel() >= MIN_NUMEL


def block_count(shape: torch.Size) -> tuple[int, ...]:
    """The shape of a quantized moment's scales: one per ``BLOCK`` values (a ``ShapeRule``)."""
    return (math.ceil(math.prod(shape) / BLOCK),)


def _build_map(signed: bool) -> tuple[float, ...]:
    values = [0.0, 1.0]
    for exponent in range(7):
        steps = 2**exponent if signed else 2 ** (exponent + 1)
        edges = [0.1 + 0.9 * i / steps for i in range(steps + 1)]
        mids = [(a + b) / 2 * 10.0 ** (exponent - 6) for a, b in zip(edges, edges[1:])]
        values += mids + ([-m for m in mids] if signed else [])
    assert len(values) == 256
    return tuple(sorted(values))


_MAPS = {signed: _build_map(signed) for signed in (True, False)}


def dynamic_map(signed: bool) -> tuple[float, ...]:
    """The 256 values of the dynamic quantization map, ascending (see the module docstring)."""
    return _MAPS[signed]


def zero_code(signed: bool) -> int:
    return dynamic_map(signed).index(0.0)


def init_code(signed: bool, init: float) -> int:
    """The code of a tensor filled with ``init``: its scale is ``abs(init)``, its code that of the sign."""
    if init == 0:
        return zero_code(signed)
    return 255 if init > 0 else 0


def _float64_table(signed: bool) -> tuple[Tensor, Tensor]:
    values = torch.tensor(_MAPS[signed], dtype=torch.float64)
    return values, (values[1:] + values[:-1]) / 2


#: the maps and their midpoints in float64, made once: a module-level tensor is one constant of a traced graph,
#: where ``torch.tensor`` of the 256 numbers inside it is 256 scalar buffers stacked every step (measured: the
#: fused 8-bit AdamW step moved 4,000 buffers and compiled for 130 s)
_TABLES = {signed: _float64_table(signed) for signed in (True, False)}


def _table(signed: bool, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The map and the midpoints between its neighbours (the coding's decision boundaries) in ``dtype``."""
    values, mids = _TABLES[signed]
    return values.to(device=device, dtype=dtype), mids.to(device=device, dtype=dtype)


def dequantize(codes: Tensor, absmax: Tensor, signed: bool, dtype: torch.dtype) -> Tensor:
    """The values that ``codes`` (uint8, any shape) and their block scales ``absmax`` stand for, in ``dtype``."""
    values, _ = _table(signed, codes.device, dtype)
    flat = codes.reshape(-1)
    # each value's scale by broadcasting the scales over their blocks: indexing them by arange(n) // BLOCK
    # instead is miscompiled by inductor (torch 2.13, CPU: wrong scales read), this form is not
    scales = absmax.reshape(-1).to(dtype)[:, None].expand(-1, BLOCK).reshape(-1)[: flat.numel()]
    return (values[flat.long()] * scales).view(codes.shape)


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of ``x``: the codes (uint8, ``x``'s shape) of the nearest map values of x / absmax,
    ``absmax`` (float32) the absolute maximum of each block of ``BLOCK`` values of ``x`` in row-major order.
    The scale is rounded to float32 first and the values divided by the rounded scale, so that decoding
    (map value * stored scale) sees the scale the coding used."""
    flat = x.reshape(-1)
    blocks = F.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).to(torch.float32)
    scale = torch.where(absmax > 0, absmax, 1.0).to(x.dtype)
    _, mids = _table(signed, x.device, x.dtype)
    y = blocks / scale[:, None]
    # the same codes either way (tests/engine/test_storage.py checks both against a nearest-value search):
    # traced, the arithmetic coder is faster (measured on 8M values, 2 cores: 24 ms against bucketize's 59 ms
    # inside an inductor kernel); eagerly, its twenty passes over the tensor are slower (403 ms against 62 ms)
    codes = _arithmetic_codes(y, signed, mids) if torch.compiler.is_compiling() else torch.bucketize(y, mids)
    if not signed:
        # a positive second moment is never coded as 0 (its smallest code instead): a first moment of the same
        # gradients keeps values 3 decades smaller than a second moment can, and m / (sqrt(0) + eps) is a step
        # of lr * m / eps (measured on the digits MLP: thousands of such values, the loss 0.12-0.18 against 0.11)
        codes = torch.where((blocks > 0) & (codes == 0), 1, codes)
    return codes.to(torch.uint8).view(-1)[: flat.numel()].view(x.shape), absmax


def _decade_lines(signed: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per decade e of the map (|y| in [10^(e-7), 10^(e-6))), the line code ~ slope * |y| + intercept that runs
    through its equal steps: e's 2^e (signed, counted from the zero code) or 2^(e+1) (unsigned) steps of
    0.9 * 10^(e-6) / steps each, starting at 0.1 * 10^(e-6), after the codes of the decades below it."""
    slopes, intercepts = [], []
    for e in range(7):
        steps = 2**e if signed else 2 ** (e + 1)
        first = steps if signed else steps - 1  # the code offset of the decade's first step
        slopes.append(steps / (0.9 * 10.0 ** (e - 6)))
        intercepts.append(first - 0.1 * steps / 0.9)
    return tuple(slopes), tuple(intercepts)


_LINES = {signed: _decade_lines(signed) for signed in (True, False)}


def _arithmetic_codes(y: Tensor, signed: bool, mids: Tensor) -> Tensor:
    """The code of the map value nearest to each ``y`` (in [-1, 1]), as ``bucketize(y, mids)`` gives it, by
    arithmetic instead of a search: the decade of |y| by six comparisons, the step within the decade from the
    decade's line, then one comparison with the two decision boundaries either side of that code. The estimate
    is at most one code off (the line is exact but for rounding, and off by one only between a decade's edge
    and the boundary of the codes either side of it; boundaries are at least 0.7 % apart), so the comparison
    with the exact boundaries makes the result exact. Comparisons and selects rather than log10 and pow:
    inductor vectorizes both, but the transcendental functions cost more than the rest of the coder."""
    a = y.abs()
    slopes, intercepts = _LINES[signed]
    slope, intercept = torch.full_like(a, slopes[0]), torch.full_like(a, intercepts[0])
    for e in range(1, 7):
        above = a >= 10.0 ** (e - 7)
        slope = torch.where(above, slopes[e], slope)
        intercept = torch.where(above, intercepts[e], intercept)
    offset = torch.floor(torch.addcmul(intercept, a, slope)).clamp(min=0)
    code = (torch.where(y < 0, 127 - offset, 127 + offset) if signed else offset).to(torch.int64)
    code = code.clamp(0, 255)  # NaN: whatever the conversion made of it, indexes inside the table
    edges = torch.cat([mids.new_full((1,), -math.inf), mids, mids.new_full((1,), math.inf)])
    return code + (y > edges[code + 1]).to(torch.int64) - (y <= edges[code]).to(torch.int64)


def absmax_name(name: str) -> str:
    return f"{name}_absmax"


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 tensors holding values below 2**32. The
    multipliers are below 2**31, so no product overflows int64 (which C++ leaves undefined)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def rounding_salt(seed: int, index: int, step: Any) -> Any:
    """One number per parameter and step that selects its random bits, below 2**24 (exact in the float32
    coefficient tensor of the fused path); ``step`` a number or a float64 tensor (tensor mode)."""
    base = (seed * 0x9E37 + index * 0x3C6EF) % (1 << 24)
    return (step * 0x61C9 + base) % (1 << 24)


def stochastic_round(x: Tensor, salt: Any) -> Tensor:
    """float32 ``x`` rounded to bfloat16 up or down at random, unbiased (see the module docstring)."""
    salt = torch.as_tensor(salt, device=x.device).to(torch.int64)
    index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    noise = _mix((index + _mix(salt & _MASK32) * 0x10001) & _MASK32) & 0xFFFF
    bits = x.contiguous().view(torch.int32)
    return ((bits + noise.to(torch.int32)) & -65536).view(torch.float32).to(torch.bfloat16)


def nearest_bfloat16(x: Tensor) -> Tensor:
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), as float32, by integer arithmetic on its
    bits. Why not ``x.to(torch.bfloat16).float()``: inductor drops such a round trip inside a compiled graph
    (it computes in float32 throughout unless told to emulate the precision of casts), and the compensation
    x - round(x) of ``weight_rounding="compensated"`` would be 0 in the fused path and in a user's compiled
    step. inf and NaN stay what they are."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & -65536).view(torch.float32)
