r"""Gradient clipping: torch's norm and value clipping as they are, adaptive (unit-wise) clipping, and one
helper that applies any of them and reports the gradient norm measured before clipping, for logging."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from stochopt.engine import checks


def _with_grads(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    return [p for p in params if p.grad is not None]


def unitwise_norm(x: Tensor) -> Tensor:
    """The norm of each unit: per output row (all dimensions but the first) for 2+ dimensions, else the whole
    tensor (biases and gains are one unit), as in Brock et al. (2021)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(parameters: Tensor | Iterable[Tensor], clipping: float = 0.01, eps: float = 1e-3) -> Tensor:
    r"""Adaptive gradient clipping, unit-wise (Brock, De, Smith & Simonyan, 2021, "High-Performance Large-Scale
    Image Recognition Without Normalization", NFNets), in place:

    .. math::
        G_i \leftarrow \begin{cases} \lambda \dfrac{\max(\|W_i\|, \epsilon)}{\|G_i\|}\, G_i &
        \text{if } \dfrac{\|G_i\|}{\max(\|W_i\|, \epsilon)} > \lambda \\ G_i & \text{otherwise} \end{cases}

    for each unit :math:`i` (:func:`unitwise_norm`), :math:`\lambda` = ``clipping``, :math:`\epsilon` = ``eps``.
    The paper leaves the final classifier layer unclipped: pass the parameters to clip. Returns the number of
    units that were clipped (a 0-d tensor, so that no device synchronization is forced).
    """
    checks.positive("clipping", clipping)
    checks.nonnegative("eps", eps)
    clipped = torch.zeros((), dtype=torch.long)
    for p in _with_grads(parameters):
        max_norm = unitwise_norm(p.detach()).clamp_min(eps) * clipping
        grad_norm = unitwise_norm(p.grad)
        # the 1e-6 floor keeps a zero gradient at zero instead of dividing 0 by 0
        scale = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-6), torch.ones_like(grad_norm))
        p.grad.mul_(scale.to(p.grad.dtype))
        clipped = clipped.to(p.device) + (grad_norm > max_norm).sum()
    return clipped


@dataclass(frozen=True)
class ClipResult:
    """``norm``: the total gradient norm before any clipping (a 0-d tensor, ``float(...)`` it to log);
    ``clipped_units``: units changed by adaptive clipping (None without it)."""

    norm: Tensor
    clipped_units: Tensor | None = None


def clip_gradients(
    parameters: Tensor | Iterable[Tensor],
    *,
    max_norm: float | None = None,
    max_value: float | None = None,
    agc: float | None = None,
    agc_eps: float = 1e-3,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> ClipResult:
    """Measure the gradient norm, then clip by value (``torch.nn.utils.clip_grad_value_``), adaptively
    (:func:`adaptive_clip_grad_` with ``clipping=agc``) and by total norm (``torch.nn.utils.clip_grad_norm_``),
    each only when its argument is given, in that order. With mixed precision and a GradScaler, call
    ``scaler.unscale_(optimizer)`` first."""
    params = _with_grads(parameters)
    for name, value in (("max_norm", max_norm), ("max_value", max_value)):
        if value is not None:
            checks.positive(name, value)
    norm = torch.nn.utils.get_total_norm(
        [p.grad for p in params], norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
    )
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(params, max_value)
    clipped_units = None if agc is None else adaptive_clip_grad_(params, agc, agc_eps)
    if max_norm is not None:
        if max_value is None and agc is None:  # the gradients are unchanged: reuse the norm measured above
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    return ClipResult(norm, clipped_units)
