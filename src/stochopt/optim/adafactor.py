"""Adafactor: Adam-like rates from a factored second moment, O(n + m) state for an n x m matrix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stochopt.engine import STEP, EngineOptimizer, StateSpec, TensorList, checks, scalar, stage_boundary
from stochopt.engine.scalars import minimum
from stochopt.optim.common import decay_factor, decoupled_decay_, ema_

#: rows summed together first by ``mean_over_rows`` (see there)
ROW_BLOCK = 8


def mean_over_rows(x: Any) -> Any:
    """``x.mean(dim=-2, keepdim=True)``; compiled, summed in blocks of ``ROW_BLOCK`` rows and then over the blocks.

    The same mean in another summation order. Why: inductor compiles a plain mean over dim -2 of a contiguous
    matrix into a loop that walks each 16-column strip down all rows, one cache line per row (on 1024 x 1024:
    3.8 ms, against 0.32 ms for an ``add`` of the same size, 2 threads). Summing ``ROW_BLOCK`` consecutive rows
    first reads memory in order and leaves a matrix 1/``ROW_BLOCK`` the size for the strided sum. Eager torch
    sums over dim -2 in memory order already. The remainder of fewer than ``ROW_BLOCK`` rows is a special case
    to the compiler when it has 0 or 1 rows: row counts fall into three classes (n % 8 = 0, 1, other) that
    each compile once, and a fourth, fewer than 2 blocks (a convolution's kernel rows), takes the plain mean.
    (Padding the rows to a multiple of 8 instead compiles once but ran 15-20% slower.)
    """
    if isinstance(x, TensorList) or not torch.compiler.is_compiling() or x.shape[-2] < 2 * ROW_BLOCK:
        return x.mean(dim=-2, keepdim=True)
    n = x.shape[-2]
    blocks = n // ROW_BLOCK
    whole = blocks * ROW_BLOCK
    partial = x[..., :whole, :].reshape(*x.shape[:-2], blocks, ROW_BLOCK, x.shape[-1]).sum(dim=-2)
    return partial.sum(dim=-2, keepdim=True).add_(x[..., whole:, :].sum(dim=-2, keepdim=True)).div_(n)


def rms(x: Any) -> Any:
    """Root mean square of a tensor (0-d), or of each tensor of a TensorList.

    Written for the fused path: squares summed along rows first, so that inductor computes the sum inside the
    row-by-row loop that computes Adafactor's update from its row and column factors (a full reduction over a
    matrix is a flat loop of its own); and divided by the size before the square root, because ``/ n ** 0.5``
    with a dynamic size ``n`` compiles to two ``pow`` calls inside that loop, for every 16 elements (measured:
    the step took twice as long).
    """
    if isinstance(x, TensorList):
        return x.rms()
    return (x * x).sum(dim=-1).sum().div(x.numel()).sqrt()


def inverse_sqrt_factors(row: Any, col: Any, eps1: Any) -> tuple[Any, Any]:
    """Factors ``a`` (n x 1) and ``b`` (1 x m) with ``a b = 1 / sqrt(row col / max(mean(row), eps1))``.

    ``1 / sqrt(max(V, eps1^2))`` for Adafactor's factored ``V = row col / max(mean(row), eps1)`` is then
    ``min(a b, 1 / eps1)``, the same number up to rounding: per element a product and a minimum instead of a
    square root and a division (the n + m square roots are taken here).
    """
    return row.div(row.mean(dim=-2, keepdim=True).clamp(min=eps1)).rsqrt(), col.rsqrt()


class Adafactor(EngineOptimizer):
    r"""Adafactor (Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost").

    For a parameter of two or more dimensions the second moment is factored over the last two dimensions:

    .. math::
        \hat\beta_{2,t} &= 1 - t^{c}, \qquad
        \rho_t = \min(\eta, 1/\sqrt t), \qquad \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t \\
        R_t &= \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_\text{cols}(g_t^2), \qquad
        C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_\text{rows}(g_t^2) \\
        \hat V_t &= R_t C_t / \max(\mathrm{mean}(R_t), \epsilon_1) \quad
            (\text{vectors: } \hat V_t = \hat\beta_{2,t} \hat V_{t-1} + (1-\hat\beta_{2,t}) g_t^2) \\
        U_t &= g_t / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad \hat U_t = U_t / \max(1, \mathrm{RMS}(U_t)/d) \\
        \theta_t &= (1 - \eta\lambda)\,\theta_{t-1} - \alpha_t \hat U_t
            \quad (\text{with } \beta_1: m_t = \beta_1 m_{t-1} + (1-\beta_1)\hat U_t,\ \theta_t = \ldots - \alpha_t m_t)

    :math:`c` = ``beta2_decay`` (-0.8), :math:`d` the update clipping threshold (1), ``eps = (eps1, eps2)``
    with ``eps1=None`` meaning the dtype's machine epsilon. ``lr`` caps the relative step size
    :math:`\rho_t`; ``lr=None`` is the paper's 1e-2. Without ``beta1`` (the default) and with these options
    the method is ``torch.optim.Adafactor``'s, and the two agree. State: an n x m matrix keeps n + m numbers
    (``row_var``, ``col_var``), a vector its own size (``variance``), plus a full-size ``exp_avg`` with beta1.
    """

    _coefficient_statistics = {"relative_step": ("rho", 1.0)}  # min(lr, 1/sqrt(t))

    _decoupled_decay = True  # decay_factor on the weights: decouple_lr applies

    _flatten = False  # the row and column statistics need the parameter's shape
    _staged = True  # see _update
    _whole_tensor_update = True  # row and column statistics, update RMS
    # With OpenMP thread counts left dynamic, inductor's column reduction (mean over dim -2) of a tall matrix ran
    # 41.5 ms against 26.9 ms fixed, on a 32000 x 256 weight. Small tensors never reach the kernel (they take
    # the foreach path), so a kernel is first compiled for a large tensor and parallelized for it.
    _compile_options: dict = {}

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor | None = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        beta1: float | None = None,
        *,
        decouple_lr: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
    ) -> None:
        defaults = dict(
            decouple_lr=decouple_lr,
            lr=1e-2 if lr is None else lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
            beta1=beta1,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.at_least("beta2_decay", group["beta2_decay"], -1.0, at_most=0.0)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}")
        if eps[0] is not None:  # eps1 = 0: a coordinate never seen nonzero gives 0/0, and RMS clipping spreads it
            checks.eps("eps[0]", eps[0])
        # eps2 = 0: a parameter that starts at 0 gets a relative step of 0 and never moves
        checks.positive("eps[1]", eps[1], "the relative step is lr * max(eps2, RMS(param)): a zero param never moves")
        checks.at_least("d (the update clipping threshold)", group["d"], 1.0)
        checks.nonnegative("weight_decay", group["weight_decay"])
        if group["beta1"] is not None:
            checks.in_unit_interval("beta1", group["beta1"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        layout = (
            STEP,
            StateSpec("row_var", shape="row", applies="matrix"),
            StateSpec("col_var", shape="col", applies="matrix"),
            StateSpec("variance", applies="vector"),
        )
        return layout + ((StateSpec("exp_avg"),) if group["beta1"] is not None else ())

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"factored": matrix, "decay": group["weight_decay"] != 0, "momentum": group["beta1"] is not None}

    def _coefficients(self, group: dict[str, Any], step: Any, states: list) -> dict[str, Any]:
        lr = scalar(group["lr"])
        eps1, eps2 = group["eps"]
        if eps1 is None:  # the machine epsilon of the dtype the update is computed in (a dtype: no value is read)
            dtype = next(t.dtype for k, t in states[0].items() if k != "step")
            eps1 = torch.finfo(dtype).eps
        eps1 = scalar(eps1)
        beta1 = scalar(group["beta1"]) if group["beta1"] is not None else 0.0
        step = step if isinstance(step, Tensor) else float(step)
        return {
            "one_minus_beta2": step ** scalar(group["beta2_decay"]),
            "rho": minimum(lr, step**-0.5),
            "eps1": eps1,
            "eps1_sq": eps1**2,
            # a tensor eps1 of 0 gives inf by itself
            "inv_eps1": 1.0 / eps1 if isinstance(eps1, Tensor) or eps1 > 0 else float("inf"),
            "eps2": scalar(eps2),
            "inv_d": 1.0 / scalar(group["d"]),
            "decay_factor": decay_factor(group, lr),
            "one_minus_beta1": 1.0 - beta1,
        }

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, factored: bool, decay: bool, momentum: bool) -> None:
        alpha = rms(p).clamp(min=c["eps2"]).mul(c["rho"])  # max(eps2, RMS(p_{t-1})) rho_t, before the decay
        g_sq = g * g
        if factored:
            row, col = state["row_var"], state["col_var"]
            ema_(row, g_sq.mean(dim=-1, keepdim=True), c["one_minus_beta2"])
            ema_(col, mean_over_rows(g_sq), c["one_minus_beta2"])
            row_factor, col_factor = inverse_sqrt_factors(row, col, c["eps1"])
            # The fused path writes the n + m factors here; without the boundary inductor would recompute them
            # (a division and a square root) for every element of the loops below. Measured on the 25 matrices
            # of `stochopt speed`: 77.5 ms per step without it, 54.1 ms with it (2.2x on the 32724 x 262 one).
            stage_boundary()
            update = (row_factor * col_factor).clamp(max=c["inv_eps1"]).mul(g)
        else:
            ema_(state["variance"], g_sq, c["one_minus_beta2"])
            update = state["variance"].clamp(min=c["eps1_sq"]).rsqrt().mul_(g)
        clip = rms(update).mul(c["inv_d"]).clamp(min=1.0)  # max(1, RMS(U)/d)
        if decay:
            decoupled_decay_(p, c["decay_factor"])
        if momentum:
            m = state["exp_avg"]
            ema_(m, update.div(clip), c["one_minus_beta1"])
            p.sub_(m.mul(alpha))
        else:
            p.sub_(update.mul(alpha.div(clip)))
