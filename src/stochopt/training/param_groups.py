"""Parameter groups from a model: which parameters are exempt from weight decay, and layer-wise lr decay."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from stochopt.engine import checks

#: modules whose weights are gains or lookup tables, not weights to shrink towards zero
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm,
    nn.Embedding, nn.EmbeddingBag,
)  # fmt: skip

NoDecayRule = Callable[[str, Tensor, nn.Module], bool]


def default_no_decay(name: str, param: Tensor, module: nn.Module) -> bool:
    """Biases and every other parameter of at most one dimension, and the weights of normalization layers
    and embeddings (``module`` is the module that owns ``param``)."""
    return param.ndim <= 1 or isinstance(module, NO_DECAY_MODULES)


def _rule(no_decay: NoDecayRule | Sequence[str] | None) -> NoDecayRule:
    if no_decay is None:
        return default_no_decay
    if callable(no_decay):
        return no_decay
    if isinstance(no_decay, str) or not all(isinstance(pattern, str) for pattern in no_decay):
        raise TypeError(f"no_decay must be a callable or a list of name patterns, got {no_decay!r}")
    patterns = list(no_decay)
    return lambda name, param, module: any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _blocks(model: nn.Module) -> list[str]:
    """The names of the repeated blocks: the entries of every outermost ModuleList/Sequential anywhere in the
    module tree (HF ``model.layers.N``, timm ``blocks.N``, the blocks of each torchvision stage ``layerK.N``),
    in registration order; a block is not looked into. With none, each top-level child is a block."""
    blocks: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            blocks.extend(f"{prefix}{name}" for name, _ in module.named_children())
            return
        for name, child in module.named_children():
            walk(f"{prefix}{name}.", child)

    walk("", model)
    return blocks or [name for name, _ in model.named_children()]


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Each parameter's layer, counted from the input, as BEiT and timm count them: the repeated blocks
    (see ``_blocks``) are layers 1 .. L in order; what comes before the first block (embeddings, a stem, the
    model's own parameters such as a class token) is layer 0, what comes after the last (the final norm, the
    head) layer L + 1, and a parameter between two blocks belongs with the next. For a transformer
    ``(embed, blocks, norm, head)`` that is embed 0, blocks 1 .. L, norm and head L + 1."""
    blocks = _blocks(model)
    ids, passed = {}, 0
    for name, _ in model.named_parameters():
        block = next((i for i, prefix in enumerate(blocks) if name.startswith(prefix + ".")), None)
        if block is None:
            ids[name] = passed + 1 if passed else 0
        else:
            ids[name] = block + 1
            passed = max(passed, block + 1)
    return ids


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float | None = None,
    no_decay: NoDecayRule | Sequence[str] | None = None,
    lr: float | None = None,
    layer_decay: float | None = None,
    layer_of: Callable[[str], int] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for any optimizer: ``optimizer = AdamW(param_groups(model, weight_decay=0.1), lr=1e-3)``.

    - Weight decay: parameters for which ``no_decay`` holds get ``weight_decay=0.0``; the others get
      ``weight_decay`` (when it is None, they carry no key and take the optimizer's default). ``no_decay`` is a
      callable ``(name, param, owning_module) -> bool`` or a list of glob patterns on parameter names
      (``["*.bias", "embed.*"]``), and replaces :func:`default_no_decay`.
    - Layer-wise lr decay (Clark et al., 2020, ELECTRA; Bao et al., 2022, BEiT): with ``layer_decay`` = d, the
      parameters of layer i of N get ``lr * d ** (N - 1 - i)``; layers by ``layer_of(name)`` or
      :func:`layer_ids`. ``lr`` is then required, since each group's lr is set.

    Each group holds its parameters in model order and a ``"param_names"`` list beside them; groups with the
    same options merge; empty groups are left out. Shared (tied) parameters appear once.
    """
    if weight_decay is not None:
        checks.nonnegative("weight_decay", weight_decay)
    if layer_decay is not None:
        checks.positive("layer_decay", layer_decay)
        if lr is None:
            raise ValueError("layer_decay needs lr: each layer's group gets lr * layer_decay ** depth")
        checks.nonnegative("lr", lr)
    exempt = _rule(no_decay)
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), module)  # tied weights: the first owner, whose name named_parameters gives
    ids = layer_ids(model) if layer_of is None else None
    named = list(model.named_parameters())
    num_layers = 1 + max((ids[n] if ids is not None else layer_of(n)) for n, _ in named) if named else 0
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, p in named:
        decayed = not exempt(name, p, owners[id(p)])
        layer = 0
        if layer_decay is not None:
            layer = ids[name] if ids is not None else int(layer_of(name))
        group = groups.get((decayed, layer))
        if group is None:
            group = groups[(decayed, layer)] = {"params": [], "param_names": []}
            if not decayed:
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group["weight_decay"] = float(weight_decay)
            if lr is not None:
                group["lr"] = float(lr) * (1.0 if layer_decay is None else layer_decay ** (num_layers - 1 - layer))
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())
