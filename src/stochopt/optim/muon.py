"""Muon: momentum orthogonalized by a Newton-Schulz iteration, with AdamW for the parameters it should not own."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stochopt.engine import STEP, EngineOptimizer, MatrixUpdate, StateSpec, checks, scalar, sharded
from stochopt.optim.adam import Adam
from stochopt.optim.common import adam_coefficients, decay_factor, decoupled_decay_

# Keller Jordan's quintic coefficients: chosen to maximize the slope at zero, so that 5 steps push every
# singular value of the (norm-scaled) input into roughly [0.7, 1.2]; exact convergence to 1 is not needed.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
_ADAM_MOMENTS = (StateSpec("exp_avg"), StateSpec("exp_avg_sq"))


def _cpu_has_native_bfloat16() -> bool:
    # torch.cpu's probes are private; without them, assume emulated bfloat16
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device multiplies it natively (CUDA GPUs that support it; CPUs with AVX512-BF16 or
    AMX), float32 elsewhere: emulated bfloat16 matmuls are slower than float32 ones (4.7x for a 392 x 392
    Newton-Schulz on an AVX-512 Xeon without BF16), and the iteration gains nothing from less precision."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_native_bfloat16() else torch.float32
    return torch.bfloat16


def newton_schulz(
    g: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""An approximate orthogonalization :math:`U V^\top` of the matrix ``g = U S V^\top`` (Jordan et al., 2024).

    .. math::
        X_0 = G / \max(\|G\|_F, \epsilon), \qquad
        X_{k+1} = a X_k + (b A_k + c A_k^2) X_k, \quad A_k = X_k X_k^\top

    The Frobenius norm bounds the spectral norm, so every singular value starts in [0, 1]; a tall matrix is
    transposed so that :math:`A_k` is the smaller Gram matrix. Computed in ``dtype`` (None:
    :func:`default_ns_dtype`, bfloat16 where the device multiplies it natively: the iteration is
    self-correcting, so it loses nothing by the low precision); the result stays in ``dtype``.
    """
    a, b, c = coefficients
    x = g.to(dtype or default_ns_dtype(g.device))
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    r"""The shape scaling of the orthogonalized update: Keller Jordan's :math:`\sqrt{\max(1, A/B)}` ("original",
    the default) or Moonshot's :math:`0.2\sqrt{\max(A, B)}` ("match_rms_adamw", Liu et al., 2025), which gives
    the update the RMS of AdamW's so that AdamW's lr and weight decay carry over; A x B is the matrix."""
    rows, cols = shape[0], math.prod(shape[1:])
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


def owned_by_muon(group: dict[str, Any], p: Tensor) -> bool:
    """The default rule: parameters of two or more dimensions are Muon's, others AdamW's; a group's
    ``use_muon=True/False`` overrides it for every parameter of the group."""
    return p.dim() >= 2 if group["use_muon"] is None else bool(group["use_muon"])


#: names of embedding tables anywhere in a model (a dotted segment that starts with "embed", or one of these)
EMBEDDING_NAMES = ("wte", "wpe", "tok_embeddings", "word_embeddings", "position_embeddings", "token_type_embeddings")
#: top-level modules that are output heads (HF ``lm_head``/``classifier``, timm ``head``, torchvision ``fc``,
#: Meta's Llama ``output``): only at the top, where a hidden ``attention.output`` cannot be meant
#: the lr of AdamW's groups where neither the user nor ``adamw_lr`` sets one (see :class:`Muon`)
DEFAULT_ADAMW_LR = 3e-4

HEAD_NAMES = ("lm_head", "head", "classifier", "fc", "output", "embed_out")


def adamw_by_name(name: str) -> bool:
    """The parameter named ``name`` is an embedding or an output head, which Muon must not own."""
    segments = name.split(".")
    return segments[0] in HEAD_NAMES or any(s.startswith("embed") or s in EMBEDDING_NAMES for s in segments)


def _named(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)


def route_params(params: Any) -> Any:
    """What Muon is given, with embeddings and heads sent to AdamW where it can tell them: a module becomes
    :func:`muon_param_groups`; named parameters (``model.named_parameters()``, as a list or in groups without
    ``use_muon``) are split by name (:func:`adamw_by_name`) and dimension (vectors, as the module rule does) into
    a group of their own with ``use_muon=False``.
    Unnamed matrices are Muon's by shape alone, with a warning: a shape cannot tell an embedding from a layer."""
    if isinstance(params, nn.Module):
        return muon_param_groups(params)
    if isinstance(params, Tensor) or not hasattr(params, "__iter__") or isinstance(params, (set, frozenset)):
        return params  # the engine's own checks name what is wrong
    items = list(params)
    groups = items if items and all(isinstance(item, dict) for item in items) else [{"params": items}]
    routed: list[dict[str, Any]] = []
    for group in groups:
        members = group.get("params")
        members = list(members) if isinstance(members, (list, tuple)) else members
        if group.get("use_muon") is not None or not isinstance(members, list) or not members:
            routed.append(group)
            continue
        if all(_named(item) for item in members):
            to_adamw = [adamw_by_name(name) or (isinstance(p, Tensor) and p.dim() < 2) for name, p in members]
            heads = [item for item, adamw in zip(members, to_adamw) if adamw]
            hidden = [item for item, adamw in zip(members, to_adamw) if not adamw]
            routed += [{**group, "params": hidden}] if hidden else []
            routed += [{**group, "params": heads, "use_muon": False}] if heads else []
            continue
        if any(isinstance(p, Tensor) and p.dim() >= 2 for p in members):
            warnings.warn(
                "Muon was given matrices without names: it cannot tell an embedding or an output head (which it "
                "should not own) from a hidden layer, and orthogonalizes every parameter of two or more dimensions; "
                "pass the model, model.named_parameters() or muon_param_groups(model)",
                UserWarning,
                stacklevel=3,
            )
        routed.append(group)
    return routed


class Muon(EngineOptimizer):
    r"""Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"), with AdamW for the
    parameters it should not own, under one ``step()``.

    For a matrix :math:`W \in \mathbb{R}^{A \times B}` (conv kernels flattened to :math:`A \times B`):

    .. math::
        B_t &= \mu B_{t-1} + (1-\mu) g_t, \qquad
        \tilde B_t = (1-\mu) g_t + \mu B_t \ \text{(Nesterov) or } B_t \\
        O_t &= \mathrm{NS}_5(\tilde B_t), \qquad
        W_t = (1 - \eta\lambda) W_{t-1} - \eta\, s(A, B)\, O_t

    with :func:`newton_schulz` and the shape scaling :math:`s` of :func:`adjusted_lr`. This is
    ``torch.optim.Muon``'s update (the EMA form of the momentum), and with the same options the two agree
    (torch always iterates in bfloat16: pass ``ns_dtype=torch.bfloat16`` for the same rounding).

    **Which parameters Muon owns.** By default parameters of two or more dimensions are Muon's and the others
    (biases, norm gains) get AdamW (:class:`stochopt.AdamW`'s update, ``adamw_betas``, ``adamw_eps``, the
    group's ``lr`` and ``weight_decay``). Embeddings and the output head are matrices that Muon should not own
    either: a group with ``use_muon=False`` sends all its parameters to AdamW (``use_muon=True`` sends all to
    Muon); :func:`muon_param_groups` builds those groups from a model. Given the model itself, Muon builds them
    so; given named parameters (``model.named_parameters()``), it sends embeddings, top-level heads
    (:func:`adamw_by_name`) and vectors to such a group; given bare tensors, it warns, since a shape cannot
    tell an embedding from a hidden layer.

    **AdamW's lr.** A ``use_muon=False`` group that sets no ``lr`` of its own (those Muon builds, and those of
    :func:`muon_param_groups` without ``adamw_lr``) takes ``adamw_lr``, and one without ``weight_decay`` takes
    ``adamw_weight_decay``: Muon's lr of 0.02 would be ~60x too large for an embedding under AdamW. The default
    ``adamw_lr=None`` is the group's Muon lr where ``adjust_lr_fn="match_rms_adamw"`` (that scaling exists so that
    one lr serves both, Liu et al. 2025), else 3e-4 (the Adam groups' default of the authors' ``MuonWithAuxAdam``
    and AdamW's lr in Jordan's recipe); ``adamw_weight_decay=None`` is ``weight_decay``. The lr lives in the
    group's ``lr``, so lr schedulers scale it with the rest.

    ``distributed=True`` (with torch.distributed initialized): each rank orthogonalizes the matrices
    assigned to it round-robin (the i-th matrix of a group to rank i mod world size) and the updated matrices
    are all-gathered; every rank must hold the same gradients (DDP, or a gradient all-reduce before ``step``).
    Every rank keeps every matrix's momentum (an EMA is cheap beside Newton-Schulz), so rank 0's checkpoint
    is whole and resumes on any world size. FSDP2 (DTensor) parameters need no flag: the momentum stays on the
    shards and the engine gathers each matrix's Nesterov direction to one owning rank for Newton-Schulz
    (``MUON_UPDATE``, docs/sharded.md); ``distributed=True`` is refused for them.
    ``foreach``/``fused`` choose the execution path of the AdamW part; the matrix work is the same in every
    path. ``ns_dtype``: the Newton-Schulz precision (None: :func:`default_ns_dtype`, bfloat16 where the
    device multiplies it natively, float32 elsewhere).
    """

    _coefficient_statistics = {"adjusted_lr": ("neg_lr", -1.0)}  # the matrices' lr after shape scaling

    _decoupled_decay = True  # decay_factor on the weights: decouple_lr applies

    _capturable = False  # its step loop decides on the host (matrix work per tensor)

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        *,
        adamw_lr: float | None = None,
        adamw_weight_decay: float | None = None,
        decouple_lr: bool = False,
        use_muon: bool | None = None,
        ns_dtype: torch.dtype | None = None,
        distributed: bool = False,
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
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_coefficients=ns_coefficients,
            eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
            adamw_lr=adamw_lr, adamw_weight_decay=adamw_weight_decay, use_muon=use_muon, ns_dtype=ns_dtype,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        checks.flag("distributed", distributed)
        self.distributed = distributed
        super().__init__(route_params(params), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("use_muon") is False:  # AdamW's group: its own lr and decay unless the user set them
            merged = {**self.defaults, **param_group}
            if "lr" not in param_group:
                lr = merged["adamw_lr"]
                if lr is None:
                    lr = merged["lr"] if merged["adjust_lr_fn"] == "match_rms_adamw" else DEFAULT_ADAMW_LR
                param_group["lr"] = lr.clone() if isinstance(lr, Tensor) else lr
            if "weight_decay" not in param_group and merged["adamw_weight_decay"] is not None:
                param_group["weight_decay"] = merged["adamw_weight_decay"]
        super().add_param_group(param_group)

    @staticmethod
    def params_from_module(model: nn.Module) -> list[dict[str, Any]]:
        """``create_optimizer("muon", model)`` builds its groups by Muon's rule: :func:`muon_param_groups`."""
        return muon_param_groups(model)

    def _validate(self, group: dict[str, Any]) -> None:
        if self.distributed and any(sharded.is_sharded(p) for p in group["params"]):
            raise ValueError(
                "Muon(distributed=True) shares the Newton-Schulz work of replicated (DDP) parameters; these are "
                "sharded (DTensor, FSDP2), whose matrices the engine already gathers to one owner each: drop "
                "distributed=True"
            )
        checks.nonnegative("lr", group["lr"])
        checks.nonnegative("weight_decay", group["weight_decay"])
        checks.in_unit_interval("momentum", group["momentum"])
        checks.flag("nesterov", group["nesterov"])
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise TypeError(f"ns_coefficients must be three numbers (a, b, c), got {coefficients!r}")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in coefficients):
            raise ValueError(f"ns_coefficients must be finite numbers, got {coefficients!r}")
        checks.eps("eps", group["eps"])
        checks.count("ns_steps", group["ns_steps"], 1)
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
        for key in ("adamw_lr", "adamw_weight_decay"):
            if group[key] is not None:
                checks.nonnegative(key, group[key])
        checks.betas(group["adamw_betas"])
        checks.eps("adamw_eps", group["adamw_eps"])
        if group["use_muon"] is not None:
            checks.flag("use_muon", group["use_muon"])
        ns_dtype = group["ns_dtype"]
        if ns_dtype is not None and (not isinstance(ns_dtype, torch.dtype) or not ns_dtype.is_floating_point):
            raise TypeError(f"ns_dtype must be a floating torch.dtype or None, got {ns_dtype!r}")

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        # STEP for every parameter: AdamW's bias corrections need it, and a Muon matrix keeps it for resumes.
        if group["use_muon"] is None:
            return (STEP, StateSpec("momentum_buffer", applies="matrix"),
                    *(StateSpec(s.name, applies="vector") for s in _ADAM_MOMENTS))  # fmt: skip
        return (STEP, StateSpec("momentum_buffer")) if group["use_muon"] else (STEP, *_ADAM_MOMENTS)

    # ----- the AdamW part: Adam's math, run by the engine in every execution path ---------------------------
    _update = staticmethod(Adam._update)

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        return adam_coefficients({**group, "betas": group["adamw_betas"], "eps": group["adamw_eps"]}, step)

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"decay": group["weight_decay"] != 0, "decoupled": True, "amsgrad": False}

    # ----- the Muon part ------------------------------------------------------------------------------------
    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], fresh: set[int], amp: Any = None
    ) -> None:
        mine = [i for i, p in enumerate(params) if owned_by_muon(group, p)]
        others = sorted(set(range(len(params))) - set(mine))
        if others:
            super()._step_group(group, [params[i] for i in others], [grads[i] for i in others], fresh)
        if not mine:
            return
        ps, gs = [params[i] for i in mine], [grads[i] for i in mine]
        world = dist.get_world_size() if self.distributed and dist.is_initialized() else 1
        if world == 1:
            for p, g in zip(ps, gs):
                self._muon_update(group, p, g)
            return
        rank = dist.get_rank()
        for i, (p, g) in enumerate(zip(ps, gs)):
            if i % world == rank:
                self._muon_update(group, p, g)
            else:  # the owner moves the matrix; every rank keeps every momentum, so any rank's checkpoint is whole
                self.state[p]["step"] += 1
                self._apply_update(group, self._momentum_math, p, g, {"momentum": scalar(group["momentum"])})
        self._all_gather(ps, world, rank)

    def _muon_update(self, group: dict[str, Any], p: Tensor, g: Tensor) -> None:
        self.state[p]["step"] += 1
        lr = scalar(group["lr"])
        c = {
            "momentum": scalar(group["momentum"]),
            "nesterov": group["nesterov"],
            "ns": (group["ns_steps"], tuple(group["ns_coefficients"]), scalar(group["eps"]), group["ns_dtype"]),
            "decay_factor": decay_factor(group, lr),
            "neg_lr": -adjusted_lr(lr, group["adjust_lr_fn"], p.shape),
        }
        # maximize, centralization (matrices) and the compute dtype as in every engine path; sharded (FSDP2), the
        # momentum stays on the shards and only the momentum direction travels to the matrix's owner
        self._apply_matrix_update(group, MUON_UPDATE, p, g, c)

    @staticmethod
    def _momentum_math(p: Tensor, g: Tensor, state: dict[str, Tensor], c: dict[str, Any]) -> None:
        state["momentum_buffer"].lerp_(g, 1.0 - c["momentum"])

    @staticmethod
    def _all_gather(ps: list[Tensor], world: int, rank: int) -> None:
        """Every rank receives each matrix from its owner: one all-gather per ``world`` matrices of one shape."""
        by_kind: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(ps):
            by_kind[(p.shape, p.dtype, p.device)].append(i)
        for indices in by_kind.values():
            # ownership is by position in the group (i mod world); gather in rounds of one matrix per rank
            rounds: dict[int, list[Tensor | None]] = defaultdict(lambda: [None] * world)
            for i in indices:
                rounds[i // world][i % world] = ps[i]
            for slots in rounds.values():
                filler = next(t for t in slots if t is not None)
                outputs = [t if t is not None else torch.empty_like(filler) for t in slots]
                mine = slots[rank] if slots[rank] is not None else torch.empty_like(filler)
                dist.all_gather(outputs, mine.contiguous())
                for t, out in zip(slots, outputs):
                    if t is not None and out is not t:
                        t.copy_(out)


def _direction(p: Tensor, g: Tensor, state: dict[str, Tensor], c: dict[str, Any]) -> Tensor:
    """Muon's elementwise first half: the momentum, and the (Nesterov) direction it gives."""
    Muon._momentum_math(p, g, state, c)
    buf = state["momentum_buffer"]
    return g.lerp(buf, c["momentum"]) if c["nesterov"] else buf


def _orthogonalized(update: Tensor, c: dict[str, Any]) -> Tensor:
    """The whole-matrix middle: Newton-Schulz of the direction, as a matrix of its first dimension's rows."""
    return newton_schulz(update.reshape(len(update), -1), *c["ns"]).reshape(update.shape)


def _decayed_step(p: Tensor, ortho: Tensor, state: dict[str, Tensor], c: dict[str, Any]) -> None:
    """The elementwise second half: decoupled decay and the step by the shape-scaled lr."""
    decoupled_decay_(p, c["decay_factor"])
    p.add_(ortho, alpha=c["neg_lr"])


#: Muon's update of one matrix, split where it needs the whole matrix (engine/update.py ``MatrixUpdate``)
MUON_UPDATE = MatrixUpdate(_direction, _orthogonalized, _decayed_step)


def muon_param_groups(
    model: nn.Module,
    *,
    adamw_lr: float | None = None,
    adamw_weight_decay: float | None = None,
    adamw_modules: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag),
    head: str | None = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`Muon`: the hidden matrices (``use_muon=True``) and everything AdamW should own
    (``use_muon=False``): biases and other parameters below two dimensions, the weights of ``adamw_modules``
    (embeddings) and of the output head. ``head`` names the head module; by default the last ``nn.Linear``
    registered in the model. ``adamw_lr``/``adamw_weight_decay`` give the AdamW group its own values."""
    names = dict(model.named_modules())
    if head is None:
        linears = [name for name, m in names.items() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    elif head not in names:
        raise ValueError(f"head {head!r} is not a module of the model; modules: {', '.join(n for n in names if n)}")
    muon, adamw, seen = [], [], set()
    for module_name, module in names.items():
        for _, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights: the first owner decides
                continue
            seen.add(id(p))
            to_adamw = p.dim() < 2 or isinstance(module, adamw_modules) or module_name == head
            (adamw if to_adamw else muon).append(p)
    groups: list[dict[str, Any]] = []
    if muon:
        groups.append({"params": muon, "use_muon": True})
    if adamw:
        group: dict[str, Any] = {"params": adamw, "use_muon": False}
        if adamw_lr is not None:
            group["lr"] = adamw_lr
        if adamw_weight_decay is not None:
            group["weight_decay"] = adamw_weight_decay
        groups.append(group)
    return groups
