"""Pieces of update math that several optimizers share, each written once.

Every function works on a Tensor (loop and fused paths) and on a TensorList (foreach path); coefficients are
Python floats in the eager paths and 0-d tensors in the fused path. The coefficient helpers (``bias_correction``,
``adam_coefficients``) work in both modes of engine/scalars.py: Python floats for an int ``step``, tensors of the
step's shape for a float64 step tensor (tensor mode), with no value read by the host.
"""

from __future__ import annotations

from typing import Any

import torch

from stochopt.engine import TensorList, checks, scalar


def bias_correction(beta: Any, step: Any) -> Any:
    """1 - beta^t: the factor that removes the zero-initialization bias of an EMA after t steps.

    A Python float for an int ``step`` (and a float ``beta``); a tensor for a step tensor or a tensor ``beta``."""
    return 1.0 - beta**step


def add_scaled(x: Any, y: Any, a: Any) -> Any:
    """x + a y, out of place.

    Under torch.compile (torch 2.13, CPU) the tensor ``alpha`` of an out-of-place ``add`` is read into the
    kernel as a float32 scalar, which costs float64 runs 1e-10 of accuracy; the fused path multiplies instead.
    """
    if isinstance(a, torch.Tensor):
        return x + y * a
    return x.add(y, alpha=a)


def l2_penalty(g: Any, p: Any, weight_decay: Any) -> Any:
    """Coupled (L2) weight decay: the gradient of (wd/2)||p||^2 added to the loss gradient."""
    return add_scaled(g, p, weight_decay)


def decoupled_decay_(p: Any, factor: Any) -> None:
    """Decoupled weight decay (Loshchilov & Hutter, 2019): p <- (1 - lr * wd) p, apart from the gradient."""
    p.mul_(factor)


def decay_factor(group: dict[str, Any], lr: Any) -> Any:
    """The multiplier of decoupled weight decay at this step: 1 - lr * wd, the form torch.optim.AdamW has,
    where changing the lr (or its schedule) changes the regularization; with the group option ``decouple_lr``,
    1 - wd, fully decoupled (Loshchilov & Hutter's form; Composer's DecoupledAdamW, optimi's
    ``decouple_lr``): the decay does not scale with the lr, and a :class:`stochopt.training.WeightDecaySchedule`
    gives it a schedule of its own."""
    wd = scalar(group["weight_decay"])
    return 1.0 - (wd if group["decouple_lr"] else lr * wd)


def weight_decay(p: Any, g: Any, c: dict[str, Any], *, decay: bool, decoupled: bool) -> Any:
    """Apply the configured form of weight decay; returns the gradient the rest of the update sees."""
    if not decay:
        return g
    if decoupled:
        decoupled_decay_(p, c["decay_factor"])
        return g
    return l2_penalty(g, p, c["weight_decay"])


def ema_(avg: Any, x: Any, one_minus_beta: Any) -> None:
    """avg <- beta avg + (1 - beta) x, as torch writes it (lerp)."""
    avg.lerp_(x, one_minus_beta)


def ema_square_(avg_sq: Any, g: Any, beta: Any, one_minus_beta: Any) -> None:
    """avg_sq <- beta avg_sq + (1 - beta) g^2: the second-moment estimate of Adam and RMSprop."""
    avg_sq.mul_(beta).addcmul_(g, g, value=one_minus_beta)


def running_max_(running: Any, x: Any) -> Any:
    """AMSGrad's running maximum of the second moment (Reddi et al., 2018); returns ``running``."""
    if isinstance(running, TensorList):
        return running.maximum_(x)
    return running.copy_(torch.maximum(running, x))


def heavy_ball_(buf: Any, g: Any, momentum: Any, dampening_factor: Any) -> None:
    """buf <- momentum buf + (1 - dampening) g (Polyak's heavy ball; dampening = momentum gives the EMA form)."""
    buf.mul_(momentum).add_(g, alpha=dampening_factor)


def nesterov_direction(g: Any, buf: Any, momentum: Any) -> Any:
    """Nesterov's look-ahead direction g + momentum buf, as torch.optim.SGD writes it (Sutskever et al., 2013)."""
    return add_scaled(g, buf, momentum)


def adam_coefficients(group: dict[str, Any], step: Any) -> dict[str, Any]:
    """The scalars of the Adam family at ``step``: EMA weights, bias corrections and decay factors.

    Python floats for an int ``step``; in tensor mode (a float64 step tensor of shape (n,)) the step-dependent
    ones are tensors of that shape and the others Python floats, or tensors where the hyperparameter is one."""
    lr = scalar(group["lr"])
    beta1, beta2 = (scalar(b) for b in group["betas"])
    wd = scalar(group["weight_decay"])
    bc1, bc2 = bias_correction(beta1, step), bias_correction(beta2, step)
    return {
        "lr": lr,
        "beta2": beta2,
        "one_minus_beta1": 1.0 - beta1,
        "one_minus_beta2": 1.0 - beta2,
        "neg_step_size": -lr / bc1,
        "bc2_sqrt": bc2**0.5,
        "eps": scalar(group["eps"]),
        "weight_decay": wd,
        "decay_factor": decay_factor(group, lr),
    }


def check_adam_group(group: dict[str, Any]) -> None:
    """Validation shared by the Adam family: lr, betas, eps, weight_decay."""
    checks.nonnegative("lr", group["lr"])
    checks.betas(group["betas"])
    checks.eps("eps", group["eps"])
    checks.nonnegative("weight_decay", group["weight_decay"])


def _ratio(numerator: Any, denominator: Any, max_ratio: Any, guard: Any) -> torch.Tensor:
    valid = (numerator > 0) & (denominator > 0)
    if guard is not None:
        valid = valid & (guard > 0)
    ratio = torch.where(valid, numerator / denominator, torch.ones_like(numerator))
    return ratio if max_ratio is None else ratio.clamp(max=max_ratio)


def trust_ratio(numerator: Any, denominator: Any, max_ratio: Any = None, guard: Any = None) -> Any:
    """Per-tensor ratio of two norms, 1 where either (or ``guard``) is zero, optionally clamped (LAMB, LARS).

    Takes 0-d norm tensors, or TensorLists of them; returns the same kind."""
    if isinstance(numerator, TensorList):
        guards = guard.tensors if guard is not None else [None] * len(numerator)
        pairs = zip(numerator.tensors, denominator.tensors, guards)
        return TensorList(_ratio(a, b, max_ratio, c) for a, b, c in pairs)
    return _ratio(numerator, denominator, max_ratio, guard)


def norm(x: Any) -> Any:
    """The L2 norm of a tensor (0-d), or of each tensor of a TensorList."""
    return x.norm() if isinstance(x, TensorList) else torch.linalg.vector_norm(x)


def cautious_direction(u: Any, g: Any, enabled: bool) -> Any:
    r"""The cautious mask (Liang et al., 2024, "Cautious Optimizers: Improving Training with One Line of Code"):
    ``u`` where it agrees in sign with the gradient, 0 elsewhere, rescaled per tensor by the fraction kept,

    .. math:: \phi = \mathbb{1}[u \odot g > 0], \qquad u \leftarrow u \odot \phi \, \frac{d}{\|\phi\|_0 + 1}

    (d the tensor's size; the +1 of the authors' code keeps a tensor with nothing kept finite). ``u`` is the
    direction the optimizer adds with a negative step size (Adam's ``m``, Lion's sign, SGD's buffer), so
    agreement in sign is a step that does not raise the loss to first order. Out of place; ``u`` when not
    ``enabled``."""
    if not enabled:
        return u
    if isinstance(u, TensorList):
        return TensorList(cautious_direction(a, b, True) for a, b in zip(u.tensors, g.tensors))
    kept = (u * g > 0).to(u.dtype)
    return u * kept * (kept.numel() / (kept.sum() + 1))
