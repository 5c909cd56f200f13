"""char_gpt: the shipped corpus, its fixed split and validation windows, and a causal model."""

from __future__ import annotations

import functools
import hashlib
import math

import torch

from stochopt.bench.workloads import load_workload
from stochopt.bench.workloads.char_gpt import corpus_text


@functools.cache
def workload():
    w = load_workload("char_gpt")
    w.setup()
    return w


def test_the_corpus_is_the_shipped_file_and_the_split_is_fixed():
    text = corpus_text()
    assert len(text) == 1_026_921 and text.isascii()
    assert hashlib.sha256(text.encode()).hexdigest().startswith("a617cdd9241f9e19")
    assert text.startswith("In the beginning God created the heaven and the earth.\n")
    w = workload()
    assert len(w.train_tokens) == int(0.9 * len(text)) and len(w.train_tokens) + len(w.val_tokens) == len(text)
    decoded = bytes(w.vocab[i] for i in w.val_tokens[:50].tolist()).decode()
    assert decoded == text[len(w.train_tokens) : len(w.train_tokens) + 50]
    x, y = w.val_batch
    assert x.shape == (w.val_windows, w.context) and torch.equal(x[:, 1:], y[:, :-1])


def test_the_model_is_causal():
    w = workload()
    model = w.init_model(0)
    for p in model.parameters():  # the residual projections start at zero; make every path carry information
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    x = w.val_batch[0][:2]
    changed = x.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % len(w.vocab)
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :40], b[:, :40])
    assert (a[:, 40:] - b[:, 40:]).abs().max() > 1e-3


def test_an_untrained_model_scores_about_log2_vocab_bits():
    w = workload()
    with torch.no_grad():
        bits = w.evaluate(w.init_model(0))
    assert abs(bits - math.log2(len(w.vocab))) < 0.5
