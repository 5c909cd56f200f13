"""AdaFisher: Adam's momentum preconditioned by the diagonal of a Kronecker-factored Fisher information."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.optim.adam import Adam
from stochopt.optim.common import adam_coefficients, bias_correction, decay_factor, decoupled_decay_, ema_

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
    """(x - min + e) / (max - min + e), e = eps * max: the paper's min-max normalization of a new factor diagonal
    (x >= 0), with the guard relative (scale-free) and in the numerator too, so that a constant diagonal maps to 1
    (it carries no relative information), not to 0."""
    low, high = x.min(), x.max()
    e = eps * high + torch.finfo(x.dtype).tiny  # tiny: an all-zero diagonal maps to 1 as well
    return (x - low + e) / (high - low + e)


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


def square_sums(module: nn.Module, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor, int]:
    r"""One pass's raw :math:`\mathrm{diag}(\bar a^\top \bar a)`, :math:`\mathrm{diag}(s^\top s)` and its
    number of rows n (the same on both sides: one per example and output position)."""
    rows_a, rows_s = layer_inputs(module, a), output_gradients(module, s)
    return rows_a.square().sum(0), rows_s.square().sum(0), rows_a.size(0)


def factor_sizes(module: nn.Module) -> tuple[int, int]:
    """Lengths of a layer's input and output factor diagonals."""
    return module.weight[0].numel() + (module.bias is not None), module.weight.size(0)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the sums of squares: float32 for half-precision layers."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


class AdaFisher(EngineOptimizer):
    r"""AdaFisher (Gomes et al., 2025, "AdaFisher: Adaptive Second Order Optimization via Fisher Information",
    ICLR 2025, arXiv:2405.16397).

    The Fisher information of a Linear or Conv2d layer is approximated block-diagonally by the Kronecker product
    :math:`H \otimes S` of the second moments of the layer's inputs :math:`\bar a` (1 appended for the bias;
    a conv layer's unfolded patches, every output position a row) and of its output gradients :math:`s`
    (K-FAC, Martens & Grosse, 2015), and only the diagonals of the factors are kept. Per step, over the n rows
    of every forward/backward pass since the last step (and of every rank, see below):

    .. math::
        \hat H_D &= \mathrm{MinMax}(\textstyle\sum_{\text{rows}} \bar a^2 / n), \qquad
        \hat S_D = \mathrm{MinMax}(\textstyle\sum_{\text{rows}} s^2 / n), \qquad
        \mathrm{MinMax}(x) = \frac{x - \min x + \epsilon \max x}{\max x - \min x + \epsilon \max x} \\
        H_D &\leftarrow \gamma H_D + (1-\gamma)\hat H_D, \qquad S_D \leftarrow \gamma S_D + (1-\gamma)\hat S_D
            \quad (H_D = S_D = 1 \text{ initially}) \\
        \tilde F_D &= S_D H_D^\top + \lambda \quad (\text{the diagonal of } S \otimes H, \text{ shaped like } W) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        \theta_t = (1-\eta\kappa)\theta_{t-1} - \frac{\eta}{1-\beta_1^t}\, m_t / \tilde F_D

    (no square root: the Fisher is the curvature itself; :math:`\epsilon = 10^{-12}`). Parameters outside
    supported layers (embeddings, norm gains, grouped convs) take Adam's step (:class:`stochopt.AdamW`'s update,
    ``betas``, ``eps``). ``centralize_gradients`` centralizes the gradient of weights (2+ dims) before
    :math:`m_t`, as in every other optimizer; ``p.grad`` is left as it is.

    Pass the model: ``AdaFisher(model, lr=1e-3)`` registers forward hooks (layer inputs) and gradient hooks on
    the layer outputs, and puts the weights and biases of its Linear and Conv2d (groups=1) layers in a group
    with ``kronecker=True``. Given plain parameters, every parameter takes the Adam step.

    Normalization: min-max maps each new diagonal into (0, 1] as in the paper, which makes the factors
    scale-free (the 1/n or 1/n^2 of a mean loss does not matter). The paper's official code
    (github.com/AtlasAnalyticsLab/AdaFisher, ``MinMaxNormalization``: ``(x - min) / (max - min + 1e-6)``) maps a
    constant diagonal to 0: the one-element :math:`\hat S_D` of a layer with one output (a scalar regression
    head) is always 0, that layer's Fisher decays to :math:`\lambda` and its step grows by up to
    :math:`1/\lambda`. Here the guard :math:`\epsilon \max x` is in the numerator too, so a constant diagonal maps
    to 1 (no relative information: the factor leaves the step as it is; an all-zero one too), and relative to the
    scale.

    Distributed: under DDP each rank sees its own batch. Before each step the raw sums of squares and row counts
    of all layers (accumulated over the step's passes) are summed over ``process_group`` in one ``all_reduce``
    of one flat buffer, and normalized after: so the factors, as the gradients, are those of the global batch
    and DDP AdaFisher equals single-process AdaFisher on it (the 1/world that DDP's averaging puts on the output
    gradients is a scale, which the normalization removes). ``process_group=None`` (default) takes the default
    group when torch.distributed is initialized with world size > 1 (every rank must then call ``step``);
    ``False`` keeps each rank's own factors. ``factor_bytes_reduced`` counts the bytes of the buffers reduced so
    far: per step, :math:`\sum_{\text{layers}} (\text{in} + [\text{bias}] + \text{out} + 1)` numbers in the
    factors' dtype (float32 for half-precision layers). The official code averages each layer's normalized EMAs
    instead (two all_reduces per layer), which is not the global batch's factor.

    Approximations, beside K-FAC's block-diagonal Kronecker form: only the factors' diagonals are kept; the
    Fisher is the empirical one (output gradients of the training loss, not of sampled labels); the factors are
    refreshed on every step from the rows of all its forward/backward passes in grad mode, normalized once (so
    gradient accumulation over micro-batches gives one big batch's factors; the official code refreshes every
    ``TCov`` steps, normalizing each pass); the EMA has the standard form with one :math:`\gamma` (the official
    code weights the two terms by separate gammas); weight decay is decoupled (AdaFisherW).
    """

    _decoupled_decay = True  # decay_factor on the weights: decouple_lr applies

    _capturable = False  # its step loop decides on the host (matrix work per tensor)
    _whole_tensor_update = True  # Kronecker factors of the whole weight

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
        decouple_lr: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
        process_group: Any = None,
    ) -> None:
        if not (process_group is None or process_group is False or isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(f"process_group must be None, False or a ProcessGroup, got {process_group!r}")
        self.process_group = process_group
        self.factor_bytes_reduced = 0
        self._owners: dict[int, tuple[nn.Module, str]] = {}  # id(param) -> (layer, "weight" or "bias")
        self._layers: list[nn.Module] = []  # the hooked layers, in model order (the layout of the reduced buffer)
        self._pending: dict[nn.Module, list[Any]] = {}  # layer -> [sum of a^2, sum of s^2, rows] of this step
        self._factors: dict[nn.Module, tuple[Tensor, Tensor]] = {}  # layer -> this step's normalized diagonals
        self._hooks: list[Any] = []
        if isinstance(params, nn.Module):
            params = self._attach(params)
        defaults = dict(
            decouple_lr=decouple_lr,
            lr=lr, betas=betas, gamma=gamma, damping=damping, eps=eps, weight_decay=weight_decay, kronecker=False,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
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
            self._layers.append(module)
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
        work = _work_dtype(a.dtype)  # sums of squares of half-precision layers in float32
        sums = square_sums(module, a.to(work), s.to(work))
        pending = self._pending.get(module)
        self._pending[module] = list(sums) if pending is None else [x + y for x, y in zip(pending, sums)]

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (its factors then stay as they are)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _reduce_group(self) -> tuple[bool, Any]:
        group = self.process_group
        if group is False or not self._layers or not (dist.is_available() and dist.is_initialized()):
            return False, None
        return dist.get_world_size(group) > 1, group

    def _refresh_factors(self) -> None:
        """This step's normalized diagonals from the pending sums, summed over the ranks first."""
        sums = self._pending
        reduce, group = self._reduce_group()
        if reduce:  # one buffer: every layer's two sums (zeros where it had no pass), then every layer's rows
            device = self._layers[0].weight.device
            dtype = functools.reduce(torch.promote_types, [_work_dtype(m.weight.dtype) for m in self._layers])
            parts, counts = [], []
            for m in self._layers:
                h, s, n = sums.get(m) or [torch.zeros(k, device=device, dtype=dtype) for k in factor_sizes(m)] + [0]
                parts += [h.to(device, dtype), s.to(device, dtype)]
                counts.append(n)
            flat = torch.cat([*parts, torch.tensor(counts, device=device, dtype=dtype)])
            dist.all_reduce(flat, group=group)
            self.factor_bytes_reduced += flat.numel() * flat.element_size()
            *chunks, totals = flat.split([p.numel() for p in parts] + [len(counts)])
            rows = totals.tolist()
            sums = {m: (chunks[2 * i], chunks[2 * i + 1], rows[i]) for i, m in enumerate(self._layers)}
        self._factors = {m: (min_max_normalize(h / n), min_max_normalize(s / n)) for m, (h, s, n) in sums.items() if n}

    # ----- the optimizer --------------------------------------------------------------------------------
    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.betas(group["betas"])
        checks.in_unit_interval("gamma", group["gamma"])
        checks.positive("damping", group["damping"])
        checks.eps("eps", group["eps"])
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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refresh_factors()  # after the closure's passes, before the step (which may skip: nonfinite)
        try:
            super().step()
        finally:  # this step's passes are used (or the step was skipped or refused); start afresh
            self._pending.clear()
            self._factors = {}
        return loss

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], fresh: set[int], amp: Any = None
    ) -> None:
        if not group["kronecker"]:
            super()._step_group(group, params, grads, fresh)
            return
        lr, gamma = scalar(group["lr"]), scalar(group["gamma"])
        beta1 = scalar(group["betas"][0])
        for p, g in zip(params, grads):
            state = self.state[p]
            state["step"] += 1
            module, role = self._owners[id(self._parameter_of(p))]
            factors = self._factors.get(module)
            if factors is not None:
                h, s = factors
                if role == "bias":  # the bias is the weight of the homogeneous input coordinate, appended last
                    own_h = h[-1:]
                else:
                    own_h = h[:-1] if module.bias is not None else h
                factors = (own_h, s)
            c = {
                "factors": factors,
                "one_minus_gamma": 1.0 - gamma,
                "one_minus_beta1": 1.0 - beta1,
                "decay": group["weight_decay"] != 0,
                "decay_factor": decay_factor(group, lr),
                "damping": scalar(group["damping"]),
                "neg_step_size": -(lr / bias_correction(beta1, int(state["step"].item()))),
            }
            # maximize, centralization (matrices) and the compute dtype as in every engine path
            self._apply_update(group, self._kronecker_update, p, g, c)

    @staticmethod
    def _kronecker_update(p: Tensor, g: Tensor, state: dict[str, Tensor], c: dict[str, Any]) -> None:
        if c["factors"] is not None:
            own_h, s = c["factors"]
            ema_(state["fisher_in"], own_h.to(state["fisher_in"]), c["one_minus_gamma"])
            ema_(state["fisher_out"], s.to(state["fisher_out"]), c["one_minus_gamma"])
        if c["decay"]:
            decoupled_decay_(p, c["decay_factor"])
        ema_(state["exp_avg"], g, c["one_minus_beta1"])
        fisher = (state["fisher_out"].view(-1, 1) * state["fisher_in"].view(1, -1)).add_(c["damping"])
        p.addcdiv_(state["exp_avg"], fisher.view(p.shape), value=c["neg_step_size"])
