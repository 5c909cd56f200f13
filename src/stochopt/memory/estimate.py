r"""Per-device training memory: parameters, gradients, optimizer state, master weights, activations and
temporary buffers, on one device or across N under ZeRO stages 1-3 (Rajbhandari et al., 2019).

Model states follow from the parameter shapes and the optimizer's declared state layout, so they are exact
for every stochopt optimizer; transformer activations follow Korthikanti et al. (2022, "Reducing Activation
Recomputation in Large Transformer Models"), and a real module's are measured by one forward pass.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from stochopt.engine import checks
from stochopt.engine.layout import state_nbytes
from stochopt.memory.layouts import module_layouts, optimizer_layout

PRECISIONS = ("fp32", "mixed", "bf16")  # mixed: 16-bit weights and gradients, float32 master weights and state
CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class Transformer:
    """A GPT-2-style decoder (learned positions, biases, tied output embedding): its parameter shapes and, with
    ``seq_len`` and ``micro_batch``, its activations."""

    layers: int
    hidden: int
    heads: int
    seq_len: int = 1024
    vocab: int = 50257
    micro_batch: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            checks.count(f.name, getattr(self, f.name), 1)
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")

    def param_shapes(self) -> list[tuple[int, ...]]:
        h = self.hidden
        block = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,)]
        return [(self.vocab, h), (self.seq_len, h)] + block * self.layers + [(h,), (h,)]

    def activation_bytes(self, checkpointing: str = "none", flash_attention: bool = False) -> int:
        r"""Korthikanti et al. (2022), no tensor/sequence parallelism, 16-bit activations. Per layer:
        :math:`sbh(34 + 5as/h)` stored; :math:`34\,sbh` with selective recomputation or with flash attention
        (both drop the :math:`5as^2b` of attention scores, softmax and its dropout); :math:`2\,sbh` (the
        layer's input) with full recomputation. Beside the layers (their section 4.3): the input embeddings'
        dropout mask :math:`sbh` and the output layer :math:`4sbh(1 + v/h)` (final layer norm and projection
        inputs, float32 logits for the cross-entropy)."""
        s, b, h, a, v = self.seq_len, self.micro_batch, self.hidden, self.heads, self.vocab
        if checkpointing == "full":
            per_layer = 2 * s * b * h
        elif checkpointing == "selective" or flash_attention:
            per_layer = 34 * s * b * h
        else:
            per_layer = 34 * s * b * h + 5 * a * s * s * b
        return self.layers * per_layer + s * b * h + 4 * s * b * h + 4 * s * b * v


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by item; ``total`` sums them."""

    optimizer: str
    num_params: int
    params: float
    grads: float
    optimizer_state: float
    master_weights: float
    activations: float
    buffers: float
    devices: int = 1
    zero_stage: int = 0
    notes: tuple[str, ...] = field(default=())

    ITEMS = ("params", "grads", "optimizer_state", "master_weights", "activations", "buffers")

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer_state + self.master_weights

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.buffers

    def items(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.ITEMS}


#: GPT-2's sizes (Radford et al., 2019); gpt2-xl is the seeds' 1.5B example
GPT2 = {
    "gpt2": Transformer(12, 768, 12), "gpt2-medium": Transformer(24, 1024, 16),
    "gpt2-large": Transformer(36, 1280, 20), "gpt2-xl": Transformer(48, 1600, 25),
}  # fmt: skip


def load_module(path: str) -> nn.Module:
    """``"package.module:Name"``: a module instance, or a class or factory called without arguments."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"module path must look like 'package.module:Name', got {path!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from None
    model = obj if isinstance(obj, nn.Module) else obj()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{path!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def measure_activations(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward during one forward pass (each storage once)."""
    storages: dict[int, int] = {}
    # weights (and views of them, such as a transposed weight) are counted as parameters, not activations
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(storages.values())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate(
    optimizer: str = "adam",
    *,
    num_params: int | None = None,
    transformer: Transformer | None = None,
    module: nn.Module | str | None = None,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    precision: str = "mixed",
    devices: int = 1,
    zero_stage: int = 0,
    checkpointing: str = "none",
    flash_attention: bool = False,
    bucket_bytes: int | None = None,
    hyperparameters: dict[str, Any] | None = None,
    in_backward: bool = False,
) -> MemoryEstimate:
    r"""Training memory per device for one of: ``num_params`` (one flat tensor), a ``transformer``
    description, or a ``module`` (an instance or ``"package.module:Name"``; with ``example_input``, its
    activations are measured by a forward pass).

    ``precision``: ``"fp32"``; ``"mixed"`` (16-bit weights and gradients, float32 master weights, the
    optimizer on the masters: the seeds' 16 bytes per parameter with Adam); ``"bf16"`` (16-bit weights,
    gradients and no masters; stochopt keeps float32 state for them, torch.optim 16-bit state).
    ``zero_stage`` 1, 2, 3 partition the optimizer state and master weights, then the gradients, then the
    parameters over ``devices``. ``bucket_bytes``: the gradient all-reduce buffer when ``devices > 1``;
    None is the seeds' single fused float32 buffer of every gradient (4 bytes per parameter); torch DDP's
    default bucket is 25 MiB. ``hyperparameters`` reach the optimizer: ``state_dtype="int8"`` (8-bit moments,
    1 byte a value and 4 a block of 2048) and ``weight_rounding`` (with ``precision="bf16"``: bfloat16 weights
    without masters; ``"compensated"`` adds 2 bytes a parameter) change the state it keeps.
    ``in_backward``: the optimizer steps each parameter in backward (stochopt.training.StepInBackward), so
    the gradients held at once are about the largest parameter's, not all of them.
    """
    sources = [x is not None for x in (num_params, transformer, module)]
    if sum(sources) != 1:
        raise ValueError("give exactly one of num_params, transformer, module")
    for name, value, allowed in (("precision", precision, PRECISIONS), ("checkpointing", checkpointing, CHECKPOINTING)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    devices = checks.count("devices", devices, 1)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3; got {zero_stage!r}")
    notes = []

    weight_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    activations = 0
    per_param = None  # layouts per parameter, for optimizers whose state depends on the layer (AdaFisher)
    if num_params is not None:
        shapes = [(checks.count("num_params", int(num_params), 1),)]
        notes.append("num_params is taken as one flat tensor: layouts that treat matrices apart need shapes")
    elif transformer is not None:
        shapes = transformer.param_shapes()
        activations = transformer.activation_bytes(checkpointing, flash_attention)
    else:
        model = load_module(module) if isinstance(module, str) else module
        shapes = [tuple(p.shape) for p in model.parameters()]
        per_param = module_layouts(optimizer, model, **(hyperparameters or {}))
        if example_input is not None:
            activations = measure_activations(model, example_input)
            notes.append("activations measured by one forward pass of example_input, in the module's dtype")
        else:
            notes.append("no example_input: activations not estimated")

    name, layout, state_dtype = optimizer_layout(optimizer, **(hyperparameters or {}))
    # the optimizer steps float32 masters under "mixed", the weights themselves otherwise
    step_dtype = torch.float32 if precision == "mixed" else weight_dtype
    metas = [torch.empty(shape, dtype=step_dtype, device="meta") for shape in shapes]
    n = sum(p.numel() for p in metas)
    weight_bytes = n * _itemsize(weight_dtype)
    layouts = per_param if per_param is not None else [layout] * len(metas)
    state = sum(state_nbytes(each, p, state_dtype) for each, p in zip(layouts, metas))
    masters = 4 * n if precision == "mixed" else 0
    buffers = 0 if devices == 1 else (4 * n if bucket_bytes is None else checks.count("bucket_bytes", bucket_bytes, 1))

    params, grads = float(weight_bytes), float(weight_bytes)
    if in_backward:
        grads = float(max(p.numel() for p in metas) * _itemsize(weight_dtype))
        notes.append("in_backward: the gradients held at once are the largest parameter's (freed once it steps)")
    state, masters = float(state), float(masters)
    if zero_stage >= 1:
        state, masters = state / devices, masters / devices
    if zero_stage >= 2:
        grads /= devices
    if zero_stage >= 3:
        params /= devices
    return MemoryEstimate(name, n, params, grads, state, masters, float(activations), float(buffers), devices,
                          zero_stage, tuple(notes))  # fmt: skip


#: the memory-lean ways to train with Adam, side by side (``stochopt memory --lean``): (label, estimate options)
LEAN_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fp32 Adam", {"precision": "fp32"}),
    ("mixed Adam", {"precision": "mixed"}),
    ("mixed 8-bit Adam", {"precision": "mixed", "hyperparameters": {"state_dtype": "int8"}}),
    ("bf16+SR 8-bit Adam", {"precision": "bf16", "hyperparameters": {"state_dtype": "int8",
                                                                     "weight_rounding": "stochastic"}}),
    ("bf16+Kahan 8-bit", {"precision": "bf16", "hyperparameters": {"state_dtype": "int8",
                                                                   "weight_rounding": "compensated"}}),
    ("bf16+SR 8-bit, in bwd", {"precision": "bf16", "in_backward": True,
                               "hyperparameters": {"state_dtype": "int8", "weight_rounding": "stochastic"}}),
)  # fmt: skip


def lean_options(**kwargs: Any) -> list[MemoryEstimate]:
    """Adam's memory under each of ``LEAN_OPTIONS`` (the same model, devices and activations: ``kwargs``)."""
    return [replace(estimate("adam", **{**kwargs, **options}), optimizer=label) for label, options in LEAN_OPTIONS]


def compare(optimizers: Sequence[str], **kwargs: Any) -> list[MemoryEstimate]:
    """The same estimate for each optimizer, side by side."""
    return [estimate(name, **kwargs) for name in optimizers]
