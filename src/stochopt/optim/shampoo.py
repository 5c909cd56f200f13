"""Shampoo: Kronecker-factored full-matrix preconditioning of each (block of a) matrix, with grafting."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.engine.scalars import where
from stochopt.optim.common import bias_correction, decay_factor, decoupled_decay_, ema_, ema_square_

GRAFTINGS = ("adagrad", "adam", "none")


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The matrix a parameter is preconditioned as: rows = first dimension (output channels of a conv)."""
    return shape[0], math.prod(shape[1:])


def block_grid(n: int, max_dim: int) -> tuple[int, int]:
    """(number of blocks, block size) splitting ``n`` into near-equal blocks of at most ``max_dim``; the last
    block is zero-padded to the block size. Zero rows leave the other rows' statistics and roots unchanged
    (the padded statistic is block-diagonal), so padding is exact, and it lets all blocks run as one batch."""
    count = -(-n // max_dim)
    return count, -(-n // count)


@dataclass(frozen=True)
class BlockStatShape:
    """Shape rule of the left (``side=0``) or right (``side=1``) statistics of every block of a matrix:
    (row blocks, column blocks, b, b)."""

    max_dim: int
    side: int

    def __call__(self, shape: torch.Size) -> tuple[int, ...]:
        (kr, br), (kc, bc) = (block_grid(d, self.max_dim) for d in matrix_shape(shape))
        return (kr, kc, br, br) if self.side == 0 else (kr, kc, bc, bc)


def to_blocks(x: Tensor, max_dim: int) -> Tensor:
    """A matrix as its (row blocks, column blocks, br, bc) blocks, zero-padded."""
    (kr, br), (kc, bc) = (block_grid(d, max_dim) for d in x.shape)
    x = F.pad(x, (0, kc * bc - x.size(1), 0, kr * br - x.size(0)))
    return x.reshape(kr, br, kc, bc).transpose(1, 2)


def from_blocks(blocks: Tensor, rows: int, cols: int) -> Tensor:
    kr, kc, br, bc = blocks.shape
    return blocks.transpose(1, 2).reshape(kr * br, kc * bc)[:rows, :cols]


def inverse_root(stat: Tensor, root: int, eps: float) -> Tensor:
    r""":math:`(S + \epsilon I)^{-1/r}` of a batch of symmetric PSD matrices, by an eigendecomposition in
    float64 (eigenvalues clamped at 0 first: rounding can make them slightly negative); returned in
    ``stat``'s dtype."""
    eigenvalues, vectors = torch.linalg.eigh(stat.double())
    scale = (eigenvalues.clamp(min=0.0) + eps).pow(-1.0 / root)
    return ((vectors * scale.unsqueeze(-2)) @ vectors.mT).to(stat.dtype)


class Shampoo(EngineOptimizer):
    r"""Shampoo (Gupta, Koren & Singer, 2018, "Shampoo: Preconditioned Stochastic Tensor Optimization"), with
    the blocking, grafting and delayed preconditioning of Anil et al. (2020, "Scalable Second Order Optimization
    for Deep Learning").

    A parameter of two or more dimensions is the matrix :math:`G \in \mathbb{R}^{m \times n}` (a conv kernel
    reshaped to out x in*kh*kw), split into blocks of at most ``max_preconditioner_dim`` per side. For each
    block, with :math:`w = 1` if :math:`\beta_2 = 1` (sums, the original Shampoo) else :math:`1 - \beta_2`:

    .. math::
        L_t &= \beta_2 L_{t-1} + w\, G_t G_t^\top, \qquad R_t = \beta_2 R_{t-1} + w\, G_t^\top G_t \\
        M_t &= \beta_1 M_{t-1} + (1-\beta_1) G_t, \qquad \hat M_t = M_t / (1-\beta_1^t)
            \quad (\hat M_t = G_t \text{ if } \beta_1 = 0) \\
        P_t &= \hat L^{-1/4} \hat M_t \hat R^{-1/4}, \qquad
            \hat L^{-1/4} = (L_\tau + \epsilon I)^{-1/4} \text{ by a float64 eigendecomposition}

    where the roots are recomputed at step :math:`\tau` every ``precondition_frequency`` steps from
    ``start_preconditioning_step`` on, and reused in between. Grafting (Agarwal et al., 2020) takes the step's
    size from a diagonal method, per block:

    .. math::
        v_t &= \beta_2 v_{t-1} + w\, g_t^2, \qquad
        D_t = \hat M_t / (\sqrt{v_t / c_t} + \epsilon_g), \quad
        c_t = 1 - \beta_2^t \text{ ("adam") or } 1 \text{ ("adagrad")} \\
        U_t &= P_t\, \|D_t\|_F / \|P_t\|_F \text{ (per block; "none": } U_t = P_t)

    and :math:`\theta_t = (1 - \eta\lambda)\theta_{t-1} - \eta U_t`. Before ``start_preconditioning_step``,
    :math:`U_t = D_t` (:math:`\hat M_t` without grafting). One-dimensional parameters take the diagonal step
    :math:`D_t` (diagonal AdaGrad with the default ``grafting="adagrad"`` and :math:`\beta_2 = 1`).
    ``foreach``/``fused`` are accepted for the contract; the matrix work is the same in every path.
    """

    _decoupled_decay = True  # decay_factor on the weights: decouple_lr applies

    _capturable = False  # its step loop decides on the host (matrix work per tensor)
    _whole_tensor_update = True  # preconditioners of the whole matrix

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        betas: tuple[float, float] = (0.9, 1.0),
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        start_preconditioning_step: int = 1,
        max_preconditioner_dim: int = 1024,
        grafting: str = "adagrad",
        graft_eps: float = 1e-8,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step, max_preconditioner_dim=max_preconditioner_dim,
            grafting=grafting, graft_eps=graft_eps,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.betas(group["betas"], closed_right=True)
        if scalar(group["betas"][0]) == 1.0:
            raise ValueError(f"betas[0] must be in [0, 1), got {group['betas'][0]!r}")
        checks.eps("eps", group["eps"])
        checks.nonnegative("weight_decay", group["weight_decay"])
        checks.count("precondition_frequency", group["precondition_frequency"], 1)
        checks.count("start_preconditioning_step", group["start_preconditioning_step"], 1)
        checks.count("max_preconditioner_dim", group["max_preconditioner_dim"], 1)
        if group["grafting"] not in GRAFTINGS:
            raise ValueError(f"grafting must be one of {GRAFTINGS}, got {group['grafting']!r}")
        if group["grafting"] == "adam" and scalar(group["betas"][1]) == 1.0:
            raise ValueError("grafting='adam' needs betas[1] < 1 (its bias correction); got betas[1]=1.0")
        checks.eps("graft_eps", group["graft_eps"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        max_dim = group["max_preconditioner_dim"]
        momentum = (StateSpec("exp_avg"),) if scalar(group["betas"][0]) > 0 else ()
        # vectors always take the diagonal step; matrices need its statistics only to graft
        graft = StateSpec("graft_sq", applies="vector" if group["grafting"] == "none" else "all")
        blocks = tuple(
            StateSpec(name, shape=BlockStatShape(max_dim, side), applies="matrix")
            for name, side in (("left", 0), ("right", 1), ("left_root", 0), ("right_root", 1))
        )
        return (STEP, *momentum, graft, *blocks)

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, Any]:
        lr = scalar(group["lr"])
        beta1, beta2 = (scalar(b) for b in group["betas"])
        return {
            "lr": lr,
            "beta2": beta2,
            "stat_weight": where(beta2 == 1.0, 1.0, 1.0 - beta2),
            "one_minus_beta1": 1.0 - beta1,
            "momentum_correction": where(beta1 > 0, bias_correction(beta1, step), 1.0),
            "graft_correction": bias_correction(beta2, step) if group["grafting"] == "adam" else 1.0,
            "graft_eps": scalar(group["graft_eps"]),
            "decay_factor": decay_factor(group, lr),
            "decay": group["weight_decay"] != 0,
            "eps": scalar(group["eps"]),
            "step": step,
            "start": group["start_preconditioning_step"],
            "frequency": group["precondition_frequency"],
            "max_dim": group["max_preconditioner_dim"],
        }

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], fresh: set[int], amp: Any = None
    ) -> None:
        for p, g in zip(params, grads):
            state = self.state[p]
            state["step"] += 1
            step = int(state["step"].item())
            # maximize, centralization (matrices) and the compute dtype as in every engine path
            self._apply_update(group, self._update, p, g, self._coefficients(group, step, [state]))

    @staticmethod
    def _update(p: Tensor, g: Tensor, state: dict, c: dict) -> None:
        """One parameter's step (matrix work, so per tensor: the engine's foreach and fused paths do not apply)."""
        if c["decay"]:
            decoupled_decay_(p, c["decay_factor"])
        direction = g
        if "exp_avg" in state:
            ema_(state["exp_avg"], g, c["one_minus_beta1"])
            direction = state["exp_avg"] / c["momentum_correction"]
        diagonal = None
        if "graft_sq" in state:
            v = state["graft_sq"]
            ema_square_(v, g, c["beta2"], c["stat_weight"])
            diagonal = direction / (v / c["graft_correction"]).sqrt_().add_(c["graft_eps"])
        if p.dim() > 1:  # the statistics accumulate from the first step, preconditioning or not
            gb = to_blocks(g.reshape(matrix_shape(g.shape)), c["max_dim"])
            state["left"].mul_(c["beta2"]).add_(gb @ gb.mT, alpha=c["stat_weight"])
            state["right"].mul_(c["beta2"]).add_(gb.mT @ gb, alpha=c["stat_weight"])
        if p.dim() < 2 or c["step"] < c["start"]:
            update = diagonal if diagonal is not None else direction
        else:
            update = Shampoo._preconditioned(direction, diagonal, state, c).view_as(p)
        p.add_(update, alpha=-c["lr"])

    @staticmethod
    def _preconditioned(direction: Tensor, diagonal: Tensor | None, state: dict, c: dict) -> Tensor:
        max_dim = c["max_dim"]
        rows, cols = matrix_shape(direction.shape)
        if (c["step"] - c["start"]) % c["frequency"] == 0:
            state["left_root"].copy_(inverse_root(state["left"], 4, c["eps"]))
            state["right_root"].copy_(inverse_root(state["right"], 4, c["eps"]))
        pb = state["left_root"] @ to_blocks(direction.reshape(rows, cols), max_dim) @ state["right_root"]
        if diagonal is not None:  # grafting: each block's step gets the norm of the diagonal method's step
            graft_norm = torch.linalg.matrix_norm(to_blocks(diagonal.reshape(rows, cols), max_dim), keepdim=True)
            own_norm = torch.linalg.matrix_norm(pb, keepdim=True)
            pb = pb * torch.where(own_norm > 0, graft_norm / own_norm, torch.zeros_like(own_norm))
        return from_blocks(pb, rows, cols)
