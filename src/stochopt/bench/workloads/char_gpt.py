"""A character-level GPT in the spirit of the NanoGPT speedrun (Keller Jordan et al., 2024): a few pre-norm
transformer blocks with causal attention (``F.scaled_dot_product_attention``), parameter-free RMS norm, QK-norm,
ReLU-squared MLPs and zero-initialized residual projections, trained on a fixed text corpus that ships with the
package.

The corpus, ``data/kjv_genesis_to_ruth.txt`` (1,026,921 ASCII bytes), is the King James Version of the Bible from
Genesis through Ruth, one verse per line without verse numbers, extracted from Debian's ``bible-kjv-text`` 4.38
package (whose copyright file records the text as out of copyright; the 1611 translation is in the public domain,
as in its Project Gutenberg edition, eBook #10, except in the United Kingdom, where the Crown's letters patent still
govern printing it). It is a file, so it is byte-identical on every Python version.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from stochopt.bench.workloads.base import Batch, Workload
from stochopt.bench.workloads.common import check_batch_size, check_positive_ints, seeded, stored_target

CORPUS = "data/kjv_genesis_to_ruth.txt"
TRAIN_FRACTION = 0.9  # the first 90% of the characters train, the last 10% validate


def corpus_text() -> str:
    """The shipped corpus."""
    return resources.files(__package__).joinpath(CORPUS).read_text(encoding="ascii")


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(4 * width, width, bias=False)
        # zero-initialized residual branches: every block starts as the identity (as in the speedrun)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(F.rms_norm(x, (c,))).view(b, t, 3, self.heads, c // self.heads).transpose(1, 3).unbind(2)
        q, k = F.rms_norm(q, (q.shape[-1],)), F.rms_norm(k, (k.shape[-1],))  # QK-norm keeps logits bounded
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.relu(self.up(F.rms_norm(x, (c,)))).square())


class CharGPT(nn.Module):
    """Token and position embeddings, ``depth`` blocks, a final RMS norm and an untied linear head."""

    def __init__(self, vocab: int, context: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width must be divisible by heads={heads}, got {width!r}")
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.token(idx) + self.position(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(F.rms_norm(x, (x.shape[-1],)))


class CharGPTWorkload(Workload):
    """Next-character prediction; loss in nats per character, metric the validation loss in bits per character on
    a fixed set of ``val_windows`` windows spread evenly over the validation text (quick, and the same every time)."""

    name = "char_gpt"
    metric = "validation bits per character"
    target = stored_target("char_gpt")
    max_steps = 800
    eval_every = 50
    batch_size = 16
    description = "character-level GPT (2 layers, width 64, context 64) on 1 MB of the King James Bible"

    def __init__(
        self, context: int = 64, width: int = 64, depth: int = 2, heads: int = 4, val_windows: int = 64
    ) -> None:
        check_positive_ints(context=context, width=width, depth=depth, heads=heads)
        self.context, self.width, self.depth, self.heads, self.val_windows = context, width, depth, heads, val_windows

    def setup(self) -> None:
        text = corpus_text().encode("ascii")
        self.vocab = sorted(set(text))
        lookup = torch.zeros(256, dtype=torch.long)
        lookup[self.vocab] = torch.arange(len(self.vocab))
        tokens = lookup[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()]
        cut = int(TRAIN_FRACTION * len(tokens))
        self.train_tokens, self.val_tokens = tokens[:cut], tokens[cut:]
        starts = torch.linspace(0, len(self.val_tokens) - self.context - 1, self.val_windows).long()
        self.val_batch = self._windows(self.val_tokens, starts)

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-character targets of the windows beginning at ``starts``."""
        rows = tokens[starts.unsqueeze(1) + torch.arange(self.context + 1)]
        return rows[:, :-1], rows[:, 1:]

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        with seeded(seed):
            return CharGPT(len(self.vocab), self.context, self.width, self.depth, self.heads)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        gen = torch.Generator().manual_seed(seed)
        high = len(self.train_tokens) - self.context - 1
        while True:
            yield self._windows(self.train_tokens, torch.randint(0, high + 1, (batch_size,), generator=gen))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def evaluate(self, model: nn.Module) -> float:
        return float(self.loss(model, self.val_batch)) / math.log(2)
