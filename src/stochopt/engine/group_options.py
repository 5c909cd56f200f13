"""What a param group may ask of the engine, checked when the group is added, as a base of ``EngineOptimizer``:
the execution path, the non-finite policy, cautious updates, statistics, ``decouple_lr``, ``capturable`` and the
storage options (``state_dtype``, ``weight_rounding``, ``rounding_seed``; engine/storage.py). Each refusal names
the argument, its value and why."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stochopt.engine import checks, sharded, storage
from stochopt.engine.layout import quantized_moments

#: what ``nonfinite=`` may be: None (step as given), "skip" (skip the step, count it) or "raise"
NONFINITE_POLICIES = (None, "skip", "raise")


class GroupOptions:
    """The group checks of ``EngineOptimizer`` (which defines ``_stored_layout`` and the class attributes read
    here: ``_rounding_supported``, ``_cautious_supported``, ``_decoupled_decay``, ``_capturable``)."""

    def _validate_storage(self, group: dict[str, Any]) -> None:
        """``state_dtype``, ``weight_rounding`` and ``rounding_seed`` (engine/storage.py)."""
        name, sd, rounding = type(self).__name__, group["state_dtype"], group["weight_rounding"]
        if sd == storage.INT8:
            if not quantized_moments(self._stored_layout(group)):
                raise ValueError(
                    f"{name} does not support state_dtype='int8': its state holds no moment stored as 8-bit codes "
                    "(the Adam family, Lion, SGD with momentum, RMSprop, Adagrad, AdEMAMix and ADOPT have them)"
                )
        elif sd is not None and (not isinstance(sd, torch.dtype) or not sd.is_floating_point):
            raise TypeError(f"state_dtype must be a floating torch.dtype, 'int8' or None, got {sd!r}")
        if rounding not in storage.WEIGHT_ROUNDINGS:
            raise ValueError(f"weight_rounding must be one of {storage.WEIGHT_ROUNDINGS}, got {rounding!r}")
        seed = group["rounding_seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"rounding_seed must be a non-negative int, got {seed!r}")
        if rounding in (None, "nearest"):
            return
        if not self._rounding_supported:
            raise ValueError(f"{name} does not support weight_rounding={rounding!r}: it also writes the weights itself")
        if sd == torch.bfloat16:
            raise ValueError(
                f"weight_rounding={rounding!r} rounds the float32 result of the update, but state_dtype="
                "torch.bfloat16 with bfloat16 parameters computes in bfloat16; keep the default state_dtype (float32), "
                "or 'int8'"
            )
        params = group["params"]
        group["params"] = params = [params] if isinstance(params, Tensor) else list(params)  # a generator once
        for index, p in enumerate(params):
            if p.dtype != torch.bfloat16:
                raise ValueError(
                    f"weight_rounding={rounding!r} is for bfloat16 parameters; params[{index}] of the group is "
                    f"{p.dtype} (put float32 parameters in a group of their own, with weight_rounding=None)"
                )

    def _decouples_decay(self, group: dict[str, Any]) -> bool:
        """The group's weight decay is the decoupled factor that ``decouple_lr`` applies to."""
        return self._decoupled_decay or bool(group.get("decoupled_weight_decay"))

    def _validate_engine_options(self, group: dict[str, Any]) -> None:
        if group["fused"] and group["foreach"]:
            raise ValueError("fused=True and foreach=True are exclusive: choose one execution path")
        if group["nonfinite"] not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {group['nonfinite']!r}")
        checks.flag("centralize_gradients", group["centralize_gradients"])
        checks.flag("cautious", group["cautious"])
        if group["cautious"] and not self._cautious_supported:
            raise ValueError(
                f"{type(self).__name__} does not support cautious=True: it masks a momentum direction by the "
                "gradient's sign, and this optimizer's update has none the engine can mask"
            )
        checks.flag("statistics", group["statistics"])
        if group["statistics"] and any(sharded.is_sharded(p) for p in group["params"]):
            raise ValueError(
                f"{type(self).__name__}: statistics=True is not supported for sharded (DTensor) parameters yet: "
                "each rank would report its own shard's norms"
            )
        checks.flag("decouple_lr", group["decouple_lr"])
        if group["decouple_lr"] and not self._decouples_decay(group):
            raise ValueError(
                f"decouple_lr=True takes the lr out of decoupled weight decay, and {type(self).__name__}'s weight "
                "decay in this group is not decoupled (it enters the gradient, or has a form of its own): drop "
                "decouple_lr, or set decoupled_weight_decay=True where the optimizer has it"
            )
        checks.flag("capturable", group["capturable"])
        if group["capturable"]:
            name = type(self).__name__
            if not self._capturable:
                raise ValueError(f"{name} does not support capturable=True: its step decides on the host")
            if group["foreach"] or group["fused"] is False:
                raise ValueError(
                    "capturable=True runs the compiled kernel (coefficients computed on the device): it cannot be "
                    f"combined with foreach={group['foreach']!r}, fused={group['fused']!r}"
                )
            if group["nonfinite"]:
                raise ValueError(
                    f"nonfinite={group['nonfinite']!r} reads the gradients' finiteness on the host, which "
                    "capturable=True rules out; use torch.amp.GradScaler, whose found_inf the step reads on the device"
                )
