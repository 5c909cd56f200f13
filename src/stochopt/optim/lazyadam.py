"""LazyAdam: Adam that touches only the rows a sparse gradient names."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stochopt.engine import StateSpec
from stochopt.engine.scalars import sqrt
from stochopt.optim.adam import ADAM_MOMENTS, Adam


class LazyAdam(Adam):
    r"""Adam for sparse gradients (``nn.Embedding(sparse=True)``): moments and parameters change only at the
    rows present in the gradient, so a step costs O(rows in the batch), not O(table). Adam is Kingma & Ba
    (2015); the lazy sparse form is that of torch.optim.SparseAdam and TensorFlow Addons' LazyAdam (2019).

    On a sparse gradient with rows :math:`R_t`, for :math:`i \in R_t` only:

    .. math::
        m_{t,i} &= \beta_1 m_{t-1,i} + (1-\beta_1) g_{t,i}, \qquad
        v_{t,i} = \beta_2 v_{t-1,i} + (1-\beta_2) g_{t,i}^2 \\
        \theta_{t,i} &= \theta_{t-1,i} - \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
                        \frac{m_{t,i}}{\sqrt{v_{t,i}} + \epsilon}

    which is ``torch.optim.SparseAdam``'s update (note where epsilon sits). A dense gradient takes the
    :class:`Adam` step, so one optimizer serves a model whose embedding is sparse and the rest dense. The step
    count t advances for every parameter with a gradient, as in SparseAdam (the "lazy" moments are not
    decayed for absent rows). No weight decay: decaying every row each step would defeat the laziness.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, 0.0, False, foreach=foreach, maximize=maximize, fused=fused,
            capturable=capturable,
            nonfinite=nonfinite, state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADAM_MOMENTS

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        c = super()._coefficients(group, step, states)
        c["sparse_neg_step"] = c["neg_step_size"] * sqrt(1.0 - c["beta2"] ** step)
        return c

    @staticmethod
    def _sparse_update(p: Tensor, g: Tensor, state: dict, c: dict, **flags: Any) -> None:
        g = g.coalesce()
        if g.sparse_dim() != 1:
            raise ValueError(
                f"LazyAdam handles sparse gradients indexed by rows (sparse_dim 1, as nn.Embedding gives), "
                f"got sparse_dim {g.sparse_dim()} for a parameter of shape {tuple(p.shape)}"
            )
        m, v = state["exp_avg"], state["exp_avg_sq"]
        rows, values = g._indices()[0], g._values().to(m.dtype)
        m_rows, v_rows = m.index_select(0, rows), v.index_select(0, rows)
        m_rows.lerp_(values, c["one_minus_beta1"])
        v_rows.mul_(c["beta2"]).addcmul_(values, values, value=c["one_minus_beta2"])
        m.index_copy_(0, rows, m_rows)
        v.index_copy_(0, rows, v_rows)
        step = m_rows.div_(v_rows.sqrt_().add_(c["eps"])).mul_(c["sparse_neg_step"])
        p.index_add_(0, rows, step.to(p.dtype))
