"""SOAP: Adam run in the eigenbasis of Shampoo's Kronecker factors, the basis refreshed by power iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.engine.layout import LOW_PRECISION
from stochopt.engine.scalars import maximum, sqrt
from stochopt.optim.common import bias_correction, decay_factor, decoupled_decay_, ema_, ema_square_

DATA_FORMATS = ("channels_first", "channels_last")


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims``: consecutive dimensions multiplied together, left to right, while the product
    stays at most ``max_dim``; a dimension that would take it above starts the next group. ``(64, 32, 3, 3)``
    with ``max_dim=1000``: ``(64, 288)``; with ``max_dim=10000``: ``(6144, 3)``; ``(6, 5)`` with 10000:
    ``(30,)`` (one 30 x 30 factor)."""
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


@dataclass(frozen=True)
class Plan:
    """How SOAP sees one parameter: the working ``shape`` (its own, or merged), which of its dimensions carry a
    Kronecker factor (``factored``; the others keep the identity basis), and whether a 4-D kernel is permuted
    ``(0, 3, 1, 2)`` before merging (``data_format="channels_last"``)."""

    shape: tuple[int, ...]
    factored: tuple[bool, ...]
    permuted: bool = False

    @property
    def factor_numel(self) -> int:
        return sum(d * d for d, f in zip(self.shape, self.factored) if f)


def plan_for(
    shape: tuple[int, ...], max_dim: int, merge_dims: bool, precondition_1d: bool, channels_last: bool = False
) -> Plan:
    """The authors' rules: a vector has a factor only with ``precondition_1d`` and at most ``max_dim`` entries; a
    tensor of two or more dimensions is merged (``merge_dims``, :func:`merged_shape`), and each dimension of at
    most ``max_dim`` has a factor; a 0-d tensor has none (plain Adam)."""
    shape = tuple(shape)
    if not shape:
        return Plan((), ())
    if len(shape) == 1:
        return Plan(shape, (bool(precondition_1d) and shape[0] <= max_dim,))
    permuted = bool(merge_dims and channels_last and len(shape) == 4)
    if permuted:
        shape = (shape[0], shape[3], shape[1], shape[2])
    work = merged_shape(shape, max_dim) if merge_dims else shape
    return Plan(work, tuple(d <= max_dim for d in work), permuted)


@dataclass(frozen=True)
class FactorShape:
    """Shape rule of the flat buffers ``GG`` (the factors) and ``Q`` (their eigenbases): every factor of the
    parameter's plan, ``d x d`` each, one after the other."""

    max_dim: int
    merge_dims: bool
    precondition_1d: bool
    channels_last: bool

    def __call__(self, shape: torch.Size) -> tuple[int, ...]:
        plan = plan_for(tuple(shape), self.max_dim, self.merge_dims, self.precondition_1d, self.channels_last)
        return (plan.factor_numel,)


def _to_work(x: Tensor, plan: Plan) -> Tensor:
    if plan.permuted:
        x = x.permute(0, 3, 1, 2)
    return x.reshape(plan.shape)


def _from_work(x: Tensor, plan: Plan, shape: torch.Size) -> Tensor:
    if plan.permuted:
        return x.reshape(shape[0], shape[3], shape[1], shape[2]).permute(0, 2, 3, 1)
    return x.reshape(shape)


def _store(dst: Tensor, work: Tensor, plan: Plan) -> None:
    """Write a working-layout tensor back into ``dst`` unless it is a view of it already."""
    out = _from_work(work, plan, dst.shape)
    if out.data_ptr() != dst.data_ptr() or out.stride() != dst.stride():
        dst.copy_(out)


def factor_views(flat: Tensor | None, plan: Plan) -> list[Tensor | None]:
    """The ``d x d`` matrices packed in ``flat`` (a ``GG`` or ``Q`` buffer), one per dimension of the plan, None
    for the dimensions without a factor."""
    views: list[Tensor | None] = []
    offset = 0
    for d, factored in zip(plan.shape, plan.factored):
        if factored and flat is not None:
            views.append(flat[offset : offset + d * d].view(d, d))
            offset += d * d
        else:
            views.append(None)
    return views


def rotate(x: Tensor, bases: list[Tensor | None], back: bool = False) -> Tensor:
    r"""``x`` in the eigenbasis (:math:`x \times_1 Q_1^\top \times_2 Q_2^\top \cdots`, for a matrix
    :math:`Q_L^\top X Q_R`), or with ``back`` out of it (:math:`Q_L X Q_R^\top`); dimensions without a basis are
    left as they are."""
    for dim, q in enumerate(bases):
        if q is not None:
            x = torch.movedim(torch.movedim(x, dim, -1) @ (q.mT if back else q), -1, dim)
    return x


def accumulate_factors(factors: list[Tensor | None], g: Tensor, weight: Any) -> None:
    r"""Each factor :math:`F_i \leftarrow \beta F_i + (1-\beta)\, G_{(i)} G_{(i)}^\top` (``weight`` = 1 - beta),
    :math:`G_{(i)}` the unfolding of ``g`` along dimension i (:math:`GG^\top` and :math:`G^\top G` of a matrix)."""
    for dim, factor in enumerate(factors):
        if factor is not None:
            rows = torch.movedim(g, dim, 0).reshape(g.shape[dim], -1)
            ema_(factor, rows @ rows.mT, weight)


def _linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


def eigenbasis(factor: Tensor) -> Tensor:
    """The eigenvectors of a symmetric factor, by descending eigenvalue, from a float64 eigendecomposition."""
    return torch.linalg.eigh(factor.double()).eigenvectors.flip(-1).to(factor.dtype)


def refresh_bases(factors: list[Tensor | None], bases: list[Tensor | None], v: Tensor) -> Tensor:
    r"""One power-iteration step per factor, as the authors' ``get_orthogonal_matrix_QR``: the columns of
    :math:`Q` ordered by the estimated eigenvalues :math:`\mathrm{diag}(Q^\top F Q)` (descending), then
    :math:`Q \leftarrow \mathrm{QR}(F Q)`. The bases are updated in place; returns ``v`` (the second moment in the
    working layout) with the same reordering along each dimension."""
    for dim, (factor, q) in enumerate(zip(factors, bases)):
        if factor is None or q is None:
            continue
        estimated = (q * (factor @ q)).sum(0)
        order = torch.argsort(estimated, descending=True, stable=True)
        v = v.index_select(dim, order)
        power = factor @ q[:, order]
        q.copy_(torch.linalg.qr(power.to(_linalg_dtype(power.dtype))).Q)
    return v


class SOAP(EngineOptimizer):
    r"""SOAP (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321): Adam
    in the eigenbasis of Shampoo's preconditioner.

    A parameter is the matrix :math:`G \in \mathbb{R}^{m \times n}` (a tensor of more dimensions has one factor per
    dimension; ``merge_dims=True`` merges its dimensions first, :func:`merged_shape`). With :math:`\beta_s` =
    ``shampoo_beta`` (``betas[1]`` by default) and :math:`L_0 = R_0 = 0`, at every step :math:`t`:

    .. math::
        L_t = \beta_s L_{t-1} + (1-\beta_s)\, G_t G_t^\top, \qquad R_t = \beta_s R_{t-1} + (1-\beta_s)\, G_t^\top G_t

    The first step only sets up the basis, :math:`Q_L, Q_R` = the eigenvectors of :math:`L_1, R_1` (by descending
    eigenvalue), and leaves the parameter where it is, as the authors' code does (so that no gradient is ever
    projected onto a basis built from itself). From step 2 on, with :math:`k = t - 1`:

    .. math::
        G'_t &= Q_L^\top G_t Q_R, \qquad M_t = \beta_1 M_{t-1} + (1-\beta_1) G'_t, \qquad
            V_t = \beta_2 V_{t-1} + (1-\beta_2)\, G'_t \odot G'_t \\
        N_t &= Q_L \frac{M_t}{\sqrt{V_t} + \epsilon} Q_R^\top, \qquad
            \theta_t = \theta_{t-1} - \eta\, \frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k}\, N_t, \qquad
            \theta_t \leftarrow (1 - \eta\lambda)\, \theta_t

    (``correct_bias=False``: step :math:`\eta`; ``normalize_grads=True``: :math:`N_t / (\mathrm{RMS}(N_t) +
    10^{-30})`). Then the factors take :math:`G_t`, and every ``precondition_frequency`` steps (:math:`k` a
    multiple of it) each basis is refreshed by one power-iteration step from the previous one,

    .. math::
        \pi = \mathrm{argsort}_\downarrow \mathrm{diag}(Q_L^\top L_t Q_L), \qquad
        Q_L \leftarrow \mathrm{QR}(L_t\, Q_L[:, \pi]), \qquad V_t \leftarrow V_t[\pi, :]

    (and so for :math:`R`); the first moment, kept in the eigenbasis, is rotated into the new one,
    :math:`M_t \leftarrow Q_L'^\top (Q_L M_t Q_R^\top) Q_R'`, while the second moment is only reordered.

    A dimension above ``max_precond_dim`` keeps the identity basis (no factor; the default 10000 keeps vocabulary
    dimensions out), and so do vectors unless ``precondition_1d=True``; a parameter with no factor at all takes
    Adam's step in this form (bias correction in the step size, :math:`\epsilon` outside the root).
    ``merge_dims`` applies to every tensor of two or more dimensions (a small matrix may become one vector with a
    single factor); ``data_format="channels_last"`` reads a 4-D kernel stored as (out, kh, kw, in) as
    (out, in, kh, kw) when merging. Names and defaults are the authors' code's; its
    ``shampoo_beta=-1`` (for ``betas[1]``) is accepted beside the default None. State per parameter:
    ``exp_avg`` (in the eigenbasis), ``exp_avg_sq``, and the flat buffers ``GG`` (factors) and ``Q`` (bases),
    whose matrices :meth:`factors` returns. ``foreach``/``fused`` are accepted for the contract; the matrix work
    is the same in every path.

    Where a factor is rank-deficient (the first steps; a side larger than the rank of the gradients), its basis
    on the null space is what eigh and QR make of rounding noise, as in the authors' code: two runs whose
    gradients differ in the last bits may then part by more than rounding. Under ``torch.compile`` the step
    therefore runs eagerly (``torch.compiler.disable``), and a compiled training step equals the eager one.
    """

    _decoupled_decay = True  # decay_factor on the weights: decouple_lr applies

    _capturable = False  # its step loop decides on the host (first step, basis refreshes: matrix work per tensor)
    _whole_tensor_update = True  # the eigenbases of the whole matrix's factors

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
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
            lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim, merge_dims=merge_dims,
            precondition_1d=precondition_1d, normalize_grads=normalize_grads, data_format=data_format,
            correct_bias=correct_bias,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.betas(group["betas"])
        beta = group["shampoo_beta"]
        if beta is not None and not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta == -1):
            try:
                checks.in_unit_interval("shampoo_beta", beta)
            except ValueError as err:
                raise ValueError(f"{err} (or None / -1: betas[1])") from None
        checks.eps("eps", group["eps"])
        checks.nonnegative("weight_decay", group["weight_decay"])
        checks.count("precondition_frequency", group["precondition_frequency"], 1)
        checks.count("max_precond_dim", group["max_precond_dim"], 1)
        for name in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias"):
            checks.flag(name, group[name])
        if group["data_format"] not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {group['data_format']!r}")

    @staticmethod
    def _plan(group: dict[str, Any], shape: tuple[int, ...]) -> Plan:
        channels_last = group["data_format"] == "channels_last"
        return plan_for(shape, group["max_precond_dim"], group["merge_dims"], group["precondition_1d"], channels_last)

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        rule = FactorShape(group["max_precond_dim"], group["merge_dims"], group["precondition_1d"],
                           group["data_format"] == "channels_last")  # fmt: skip
        applies = "all" if group["precondition_1d"] else "matrix"  # vectors have factors only with precondition_1d
        factors = tuple(StateSpec(name, shape=rule, applies=applies) for name in ("GG", "Q"))
        return (STEP, StateSpec("exp_avg"), StateSpec("exp_avg_sq"), *factors)

    def _coefficients(self, group: dict[str, Any], step: Any, states: list) -> dict[str, Any]:
        lr = scalar(group["lr"])
        beta1, beta2 = (scalar(b) for b in group["betas"])
        beta_s = group["shampoo_beta"]
        beta_s = beta2 if beta_s is None or (not isinstance(beta_s, Tensor) and beta_s == -1) else scalar(beta_s)
        k = maximum(step - 1, 1)  # Adam's step count; the first step (k = 0) takes no Adam step
        step_size = lr * sqrt(bias_correction(beta2, k)) / bias_correction(beta1, k) if group["correct_bias"] else lr
        return {
            "step_size": step_size,
            "one_minus_beta1": 1.0 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1.0 - beta2,
            "eps": scalar(group["eps"]),
            "shampoo_weight": 1.0 - beta_s,
            "decay": group["weight_decay"] != 0,
            "decay_factor": decay_factor(group, lr),
            "normalize": group["normalize_grads"],
        }

    # Eager under torch.compile: traced matmuls round differently from eager ones, and the basis refresh is not
    # continuous where a factor is rank-deficient (the QR orthonormalizes rounding noise in its null space, as in
    # the authors' code), so a traced step would take another trajectory than the eager one; eager it is the same.
    @torch._disable_dynamo  # torch.compiler.disable, imported lazily (see Prodigy.step)
    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], fresh: set[int], amp: Any = None
    ) -> None:
        frequency = group["precondition_frequency"]
        for p, g in zip(params, grads):
            state = self.state[p]
            state["step"] += 1
            step = int(state["step"].item())
            flags = {
                "plan": self._plan(group, tuple(p.shape)),
                "first": step == 1,
                "refresh": step > 1 and (step - 1) % frequency == 0,
            }
            # maximize, centralization (matrices) and the compute dtype as in every engine path
            self._apply_update(group, self._update, p, g, self._coefficients(group, step, [state]), flags)

    @staticmethod
    def _update(p: Tensor, g: Tensor, state: dict, c: dict, *, plan: Plan, first: bool, refresh: bool) -> None:
        """One parameter's step (matrix work, so per tensor: the engine's foreach and fused paths do not apply)."""
        gw = _to_work(g, plan)
        factors = factor_views(state.get("GG"), plan)
        bases = factor_views(state.get("Q"), plan)
        if first:  # the basis from the first factors; no step (the authors' code skips it)
            accumulate_factors(factors, gw, c["shampoo_weight"])
            for factor, q in zip(factors, bases):
                if factor is not None and q is not None:
                    q.copy_(eigenbasis(factor))
            return
        m, v = _to_work(state["exp_avg"], plan), _to_work(state["exp_avg_sq"], plan)
        projected = rotate(gw, bases)
        ema_(m, projected, c["one_minus_beta1"])
        ema_square_(v, projected, c["beta2"], c["one_minus_beta2"])
        update = rotate(m / v.sqrt().add_(c["eps"]), bases, back=True)
        if c["normalize"]:
            update = update / (update.square().mean().sqrt() + 1e-30)
        p.add_(_from_work(update, plan, p.shape), alpha=-c["step_size"])
        if c["decay"]:  # after the step, scaled by lr (the authors' order)
            decoupled_decay_(p, c["decay_factor"])
        accumulate_factors(factors, gw, c["shampoo_weight"])
        if refresh:
            original = rotate(m, bases, back=True)  # the first moment out of the old basis ...
            v = refresh_bases(factors, bases, v)
            m.copy_(rotate(original, bases))  # ... and into the new one
        _store(state["exp_avg"], m, plan)
        _store(state["exp_avg_sq"], v, plan)

    @torch.no_grad()
    def factors(self, p: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """The Kronecker factors and their eigenbases of parameter ``p``, ``(F_i, Q_i)`` per dimension of its
        working shape (merged with ``merge_dims``), None for a dimension in the identity basis; views into the
        state, empty before the first step."""
        group = next((group for group in self.param_groups if any(q is p for q in group["params"])), None)
        if group is None:
            raise ValueError(f"the tensor of shape {tuple(p.shape)} is not a parameter of this SOAP")
        state = self.state.get(p)
        plan = self._plan(group, tuple(p.shape))
        if not state or "GG" not in state:
            return [None] * len(plan.shape) if state else []
        pairs = zip(factor_views(state["GG"], plan), factor_views(state["Q"], plan))
        return [None if f is None else (f, q) for f, q in pairs]
