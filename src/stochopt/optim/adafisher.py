"""AdaFisher: Adam's momentum preconditioned by the diagonal of a Kronecker-factored Fisher information."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.engine.layout import state_dtype_for
from stochopt.optim.adam import Adam
from stochopt.optim.common import adam_coefficients, bias_correction, decoupled_decay_, ema_

_ADAM_STATE = (STEP, StateSpec("exp_avg"), StateSpec("exp_avg_sq"))


@dataclass(frozen=True)
class FactorShape:
    """Shape rule of a parameter's slice of the factor diagonals: a weight's input side is its flattened fan-in,
    a bias's is the one homogeneous coordinate; the output side is the first dimension."""

    side: str

    def __call__(self, shape: torch.Size) -> tuple[int, ...]:
        if self.side == "out":
            return (shape[0],)
        return (math.prod(shape[1:]),) if len(shape) > 1 else (1,)


def min_max_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """(x - min) / (max - min + eps): the paper's normalization of each new factor diagonal."""
    low = x.min()
    return (x - low) / (x.max() - low + eps)


def layer_inputs(module: nn.Module, a: Tensor) -> Tensor:
    """The rows whose outer products form the input factor: a Linear layer's inputs, or a Conv2d layer's
    unfolded patches (one row per output position, channel-major like the flattened kernel), with a 1
    appended when the layer has a bias."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.size(1))
    else:
        rows = a.reshape(-1, a.size(-1))
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.size(0), 1)], dim=1)
    return rows


def output_gradients(module: nn.Module, s: Tensor) -> Tensor:
    """The rows whose outer products form the output factor: gradients of the layer's outputs (pre-activations),
    one row per example and output position."""
    if isinstance(module, nn.Conv2d):
        return s.transpose(1, -1).reshape(-1, s.size(1))
    return s.reshape(-1, s.size(-1))


def factor_diagonals(module: nn.Module, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    r"""The normalized diagonals :math:`\hat H_D = \mathrm{diag}(\bar a^\top \bar a)/n` and
    :math:`\hat S_D = \mathrm{diag}(s^\top s)/n` of one batch (n rows), each min-max normalized."""
    rows_a, rows_s = layer_inputs(module, a), output_gradients(module, s)
    h = rows_a.square().sum(0) / rows_a.size(0)
    g = rows_s.square().sum(0) / rows_s.size(0)
    return min_max_normalize(h), min_max_normalize(g)


def supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


class AdaFisher(EngineOptimizer):
    r"""AdaFisher (Gomes et al., 2025, "AdaFisher: Adaptive Second Order Optimization via Fisher Information",
    ICLR 2025, arXiv:2405.16397).

    The Fisher information of a Linear or Conv2d layer is approximated block-diagonally by the Kronecker product
    :math:`H \otimes S` of the second moments of the layer's inputs :math:`\bar a` (1 appended for the bias;
    a conv layer's unfolded patches, every output position a row) and of its output gradients :math:`s`
    (K-FAC, Martens & Grosse, 2015), and only the diagonals of the factors are kept. Per step:

    .. math::
        \hat H_D &= \mathrm{MinMax}(\mathrm{diag}(\bar a^\top \bar a)/n), \qquad
        \hat S_D = \mathrm{MinMax}(\mathrm{diag}(s^\top s)/n) \\
        H_D &\leftarrow \gamma H_D + (1-\gamma)\hat H_D, \qquad S_D \leftarrow \gamma S_D + (1-\gamma)\hat S_D
            \quad (H_D = S_D = 1 \text{ initially}) \\
        \tilde F_D &= S_D H_D^\top + \lambda \quad (\text{the diagonal of } S \otimes H, \text{ shaped like } W) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        \theta_t = (1-\eta\kappa)\theta_{t-1} - \frac{\eta}{1-\beta_1^t}\, m_t / \tilde F_D

    (no square root: the Fisher is the curvature itself). Parameters outside supported layers (embeddings,
    norm gains, grouped convs) take Adam's step (:class:`stochopt.AdamW`'s update, ``betas``, ``eps``).

    Pass the model: ``AdaFisher(model, lr=1e-3)`` registers forward hooks (layer inputs) and gradient hooks on
    the layer outputs, and puts the weights and biases of its Linear and Conv2d (groups=1) layers in a group
    with ``kronecker=True``. Given plain parameters, every parameter takes the Adam step.

    Approximations, beside K-FAC's block-diagonal Kronecker form: only the factors' diagonals are kept; the
    Fisher is the empirical one (output gradients of the training loss, not of sampled labels); each new
    diagonal is min-max normalized (the paper's choice; it makes the factors scale-free, so the 1/n or 1/n^2
    of a mean loss does not matter); the factors are updated on every forward/backward pass in grad mode and
    averaged over the passes of one step (the official code refreshes every ``TCov`` steps); the EMA has the
    standard form with one :math:`\gamma` (the official code weights the two terms by separate gammas);
    weight decay is decoupled (AdaFisherW).
    """

    @staticmethod
    def params_from_module(model: nn.Module) -> nn.Module:
        """``create_optimizer("adafisher", model)`` passes the model itself: the hooks need its layers."""
        return model

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        gamma: float = 0.92,
        damping: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        self._owners: dict[int, tuple[nn.Module, str]] = {}  # id(param) -> (layer, "weight" or "bias")
        self._pending: dict[nn.Module, list[Any]] = {}  # layer -> [sum of H diagonals, sum of S diagonals, count]
        self._inputs: dict[nn.Module, Tensor] = {}
        self._hooks: list[Any] = []
        if isinstance(params, nn.Module):
            params = self._attach(params)
        defaults = dict(
            lr=lr, betas=betas, gamma=gamma, damping=damping, eps=eps, weight_decay=weight_decay, kronecker=False,
            maximize=maximize, foreach=foreach, fused=fused, nonfinite=nonfinite, state_dtype=state_dtype,
        )  # fmt: skip
        super().__init__(params, defaults)

    # ----- factors from the model ---------------------------------------------------------------------------
    def _attach(self, model: nn.Module) -> list[dict[str, Any]]:
        kronecker, seen = [], set()
        for module in model.modules():
            if not supported(module):
                continue
            for role in ("weight", "bias"):
                p = getattr(module, role)
                if p is not None and p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    kronecker.append(p)
                    self._owners[id(p)] = (module, role)
            self._hooks.append(module.register_forward_hook(self._save_input))
        others = [p for p in model.parameters() if id(p) not in seen and p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": kronecker, "kronecker": True}] if kronecker else []
        return groups + ([{"params": others}] if others else [])

    def _save_input(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        a = inputs[0].detach()
        output.register_hook(lambda s: self._save_output_grad(module, a, s))

    @torch.no_grad()
    def _save_output_grad(self, module: nn.Module, a: Tensor, s: Tensor) -> None:
        work = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype  # sums of squares in float32
        h, g = factor_diagonals(module, a.to(work), s.to(work))
        pending = self._pending.get(module)
        if pending is None:
            self._pending[module] = [h, g, 1]
        else:
            pending[0] = pending[0] + h
            pending[1] = pending[1] + g
            pending[2] += 1

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (its factors then stay as they are)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ----- the optimizer --------------------------------------------------------------------------------
    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.betas(group["betas"])
        checks.in_unit_interval("gamma", group["gamma"])
        checks.positive("damping", group["damping"])
        checks.nonnegative("eps", group["eps"])
        checks.nonnegative("weight_decay", group["weight_decay"])
        checks.flag("kronecker", group["kronecker"])
        if group["kronecker"]:
            params = group["params"] if isinstance(group["params"], (list, tuple)) else [group["params"]]
            orphans = [i for i, p in enumerate(params) if id(p) not in self._owners]
            if orphans:
                raise ValueError(
                    f"kronecker=True needs the weights and biases of the model's Linear/Conv2d layers (pass the "
                    f"model: AdaFisher(model)); params {orphans} of the group are not"
                )

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        if not group["kronecker"]:
            return _ADAM_STATE
        return (
            STEP, StateSpec("exp_avg"),
            StateSpec("fisher_in", shape=FactorShape("in"), init=1.0),
            StateSpec("fisher_out", shape=FactorShape("out"), init=1.0),
        )  # fmt: skip

    # the Adam step of the other parameters: Adam's math, run by the engine in every execution path
    _update = staticmethod(Adam._update)

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        return adam_coefficients(group, step)

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"decay": group["weight_decay"] != 0, "decoupled": True, "amsgrad": False}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        self._pending.clear()  # factors of this step's passes are used (or the step was skipped); start afresh
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], fresh: set[int]) -> None:
        if not group["kronecker"]:
            super()._step_group(group, params, grads, fresh)
            return
        lr, gamma = scalar(group["lr"]), scalar(group["gamma"])
        beta1 = scalar(group["betas"][0])
        for p, g in zip(params, grads):
            state = self.state[p]
            state["step"] += 1
            module, role = self._owners[id(p)]
            pending = self._pending.get(module)
            if pending is not None:
                h, s, count = pending
                if role == "bias":  # the bias is the weight of the homogeneous input coordinate, appended last
                    own_h = h[-1:]
                else:
                    own_h = h[:-1] if module.bias is not None else h
                ema_(state["fisher_in"], own_h.to(state["fisher_in"].dtype) / count, 1.0 - gamma)
                ema_(state["fisher_out"], s.to(state["fisher_out"].dtype) / count, 1.0 - gamma)
            compute_dtype = state_dtype_for(p, group["state_dtype"])
            g = (-g if group["maximize"] else g).to(compute_dtype)
            target = p if p.dtype == compute_dtype else p.to(compute_dtype)
            if group["weight_decay"] != 0:
                decoupled_decay_(target, 1.0 - lr * scalar(group["weight_decay"]))
            ema_(state["exp_avg"], g, 1.0 - beta1)
            fisher = (state["fisher_out"].view(-1, 1) * state["fisher_in"].view(1, -1)).add_(scalar(group["damping"]))
            step_size = lr / bias_correction(beta1, int(state["step"].item()))
            target.addcdiv_(state["exp_avg"], fisher.view(p.shape), value=-step_size)
            if target is not p:
                p.copy_(target)
