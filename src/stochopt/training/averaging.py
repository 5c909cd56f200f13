"""Weight averaging (SWA, EMA) on torch.optim.swa_utils, with the bookkeeping of the training loop done once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

from stochopt.engine import checks


def _module(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _Averaging:
    """What SWA and EMA share: the averaged copy, the call count, batch-norm statistics, checkpoints."""

    _keys: tuple[str, ...] = ("calls", "averaged")

    def __init__(self, model: nn.Module, averaged: AveragedModel) -> None:
        self._source = model
        #: the averaged copy (torch's ``AveragedModel``): evaluate this one
        self.model = averaged
        self.calls = 0

    def finalize(self, loader: Iterable[Any] | None = None) -> AveragedModel:
        """Recompute the averaged model's batch-norm statistics with one pass over ``loader`` (``update_bn``).

        Averaged weights never ran forward, so the running statistics they hold (copied from the trained
        model) do not describe their activations. Each batch is a tensor or a tuple whose first element is
        the input. A no-op for a model without batch norm. Returns :attr:`model`.
        """
        if self.model.n_averaged.item() == 0:
            raise RuntimeError(f"{type(self).__name__}.finalize: no weights averaged yet ({self.calls} step() calls)")
        if _has_batch_norm(self.model):
            if loader is None:
                raise ValueError(
                    "finalize needs a loader: the model has batch norm, whose statistics must be recomputed "
                    "under the averaged weights"
                )
            param = next(self.model.parameters(), None)
            update_bn(loader, self.model, device=None if param is None else param.device)
        return self.model

    def _check_keys(self, state_dict: dict[str, Any]) -> None:
        missing = [key for key in self._keys if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict was not saved by {type(self).__name__}: it lacks {missing}")

    def state_dict(self) -> dict[str, Any]:
        """The call count and the averaged model's weights and statistics, for :meth:`load_state_dict`."""
        return {"calls": self.calls, "averaged": self.model.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (a checkpoint of the same kind of average, checked by its keys)."""
        self._check_keys(state_dict)
        calls = checks.count("state_dict['calls']", state_dict["calls"], 0)
        self.model.load_state_dict(state_dict["averaged"])
        self.calls = calls


class SWA(_Averaging):
    r"""Stochastic weight averaging (Izmailov et al., 2018, "Averaging Weights Leads to Wider Optima and Better
    Generalization"): the equal-weight mean of the weights visited late in training.

    Call :meth:`step` once after each optimizer step. With :math:`i` the 0-based index of the step just taken,
    the weights :math:`\theta_i` join the average when :math:`i \ge` ``start`` and
    :math:`(i - \text{start}) \bmod` ``every`` :math:`= 0`:

    .. math::
        \theta_{\mathrm{SWA}} \leftarrow \frac{n\,\theta_{\mathrm{SWA}} + \theta_i}{n + 1}, \qquad n \leftarrow n + 1

    ``scheduler`` (optional, stepped per step) sets the lr before ``start`` and is not stepped from there on.
    With ``swa_lr``, a ``SWALR`` built at ``start`` takes the lr over: step ``start + 1 + j`` runs at the rate
    ``j / anneal_steps`` of the way (``anneal_strategy``) from the current rate to ``swa_lr``, and at ``swa_lr``
    from ``j = anneal_steps`` on; ``anneal_steps = 0`` is the paper's switch to a constant rate. Without
    ``swa_lr`` the lr is left alone. Calling :meth:`step` once per
    epoch instead makes ``start``, ``every`` and ``anneal_steps`` count epochs, as in the paper.

    :attr:`model` is the ``torch.optim.swa_utils.AveragedModel`` (``model.module`` is the plain averaged
    copy); call :meth:`finalize` with the training data once at the end to recompute its batch-norm
    statistics. :meth:`state_dict` holds the average, the step count and the SWALR state.
    """

    _keys = ("calls", "averaged", "swa_scheduler")

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        start: int,
        *,
        every: int = 1,
        swa_lr: float | Sequence[float] | None = None,
        anneal_steps: int = 0,
        anneal_strategy: str = "cos",
        scheduler: LRScheduler | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        _module(model)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        self.start = checks.count("start", start, 0)
        self.every = checks.count("every", every, 1)
        if swa_lr is not None:
            rates = list(swa_lr) if isinstance(swa_lr, (list, tuple)) else [swa_lr]
            if isinstance(swa_lr, (list, tuple)) and len(rates) != len(optimizer.param_groups):
                raise ValueError(
                    f"swa_lr must be one lr or a list of one per param group ({len(optimizer.param_groups)}), "
                    f"got {swa_lr!r}"
                )
            for rate in rates:
                checks.nonnegative("swa_lr", rate)
        self.anneal_steps = checks.count("anneal_steps", anneal_steps, 0)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        if scheduler is not None:
            if not isinstance(scheduler, LRScheduler) or isinstance(scheduler, ReduceLROnPlateau):
                raise TypeError(
                    "scheduler must be an lr scheduler that steps without arguments (not ReduceLROnPlateau), got "
                    f"{type(scheduler).__name__}"
                )
            if scheduler.optimizer is not optimizer:
                raise ValueError("scheduler drives another optimizer than the one given to SWA")
        super().__init__(model, AveragedModel(model, device=device))
        self.optimizer, self.scheduler = optimizer, scheduler
        self.swa_lr, self.anneal_strategy = swa_lr, anneal_strategy
        self.swa_scheduler: SWALR | None = None

    def step(self) -> None:
        """Record the optimizer step just taken: average its weights or step the lr schedule as due."""
        index = self.calls
        self.calls += 1
        if index < self.start:
            if self.scheduler is not None:
                self.scheduler.step()
            return
        if (index - self.start) % self.every == 0:
            self.model.update_parameters(self._source)
        if self.swa_lr is not None:
            if self.swa_scheduler is None:
                self.swa_scheduler = self._make_swalr()  # its first rate applies to step start + 1
            else:
                self.swa_scheduler.step()

    def _make_swalr(self) -> SWALR:
        return SWALR(self.optimizer, swa_lr=self.swa_lr, anneal_epochs=self.anneal_steps,
                     anneal_strategy=self.anneal_strategy)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        swalr = self.swa_scheduler.state_dict() if self.swa_scheduler is not None else None
        return {**super().state_dict(), "swa_scheduler": swalr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (a checkpoint of the same kind of average, checked by its keys)."""
        self._check_keys(state_dict)
        saved = state_dict["swa_scheduler"]
        if saved is not None and self.swa_lr is None:
            raise ValueError("state_dict holds an SWALR state, but this SWA has swa_lr=None")
        super().load_state_dict(state_dict)
        self.swa_scheduler = None
        if saved is not None:
            self.swa_scheduler = self._make_swalr()
            self.swa_scheduler.load_state_dict(saved)


class EMA(_Averaging):
    r"""Exponential moving average of the weights (Polyak averaging with exponential weights).

    Call :meth:`step` once after each optimizer step; with :math:`i` the 0-based index of the step just taken,
    every ``every``-th step (:math:`i \bmod` ``every`` :math:`= 0`) updates

    .. math::
        \theta_{\mathrm{EMA}} \leftarrow d\,\theta_{\mathrm{EMA}} + (1 - d)\,\theta_i

    with :math:`d` = ``decay``, starting from the weights of step 0; the average spans about
    ``every / (1 - decay)`` steps. Batch-norm buffers are copied from the model at each update;
    :meth:`finalize` recomputes them for the averaged weights. :attr:`model` is the ``AveragedModel``.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.999, every: int = 1, *, device: torch.device | str | None = None
    ) -> None:
        _module(model)
        checks.in_unit_interval("decay", decay, closed_right=True)
        self.decay = float(decay)
        self.every = checks.count("every", every, 1)
        super().__init__(model, AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(self.decay)))

    def step(self) -> None:
        """Record the optimizer step just taken: fold its weights into the average when due."""
        if self.calls % self.every == 0:
            self.model.update_parameters(self._source)
        self.calls += 1
