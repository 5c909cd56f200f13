"""SOAP against a float64 loop written here from the authors' reference code (nikhilvyas/SOAP, soap.py): its
merging rule, its per-dimension factors, eigh for the first basis, one QR power-iteration step per refresh with
the columns sorted by the estimated eigenvalues, the first moment projected back and forth around every
preconditioner update, and the first step that only builds the basis."""

from __future__ import annotations

import math

import pytest
import torch

import stochopt
from stochopt.optim.soap import merged_shape
from tests.conftest import clone_params, make_params, set_grads


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for these tiny matrices: on the shared 2-core machine MKL's threaded QR of a 6 x 6 matrix took
    13 ms (its threads wait on each other), one thread 0.1 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_merge(shape: tuple[int, ...], max_dim: int) -> list[int]:
    """The reference's ``merge_dims``: running products, cut where the next one would pass max_dim."""
    out, current = [], 1
    for size in shape:
        if current * size > max_dim:
            out.append(current if current > 1 else size)
            current = size if current > 1 else 1
        else:
            current *= size
    if current > 1 or not out:
        out.append(current)
    return out


class Reference:
    """One parameter's SOAP, as the reference's ``step`` / ``update_preconditioner`` run it."""

    def __init__(self, p: torch.Tensor, hp: dict) -> None:
        self.hp = hp
        self.shape = tuple(p.shape)
        self.permute = hp.get("merge_dims", False) and hp.get("data_format") == "channels_last" and p.dim() == 4
        max_dim = hp.get("max_precond_dim", 10000)
        if p.dim() == 1:
            self.work = [p.shape[0]]
            keep = [hp.get("precondition_1d", False) and p.shape[0] <= max_dim]
        else:
            shape = [self.shape[i] for i in (0, 3, 1, 2)] if self.permute else list(self.shape)
            self.work = reference_merge(shape, max_dim) if hp.get("merge_dims", False) else shape
            keep = [d <= max_dim for d in self.work]
        self.GG = [torch.zeros(d, d, dtype=p.dtype) if k else None for d, k in zip(self.work, keep)]
        self.Q = None
        self.exp_avg = torch.zeros(self.work, dtype=p.dtype)
        self.exp_avg_sq = torch.zeros(self.work, dtype=p.dtype)
        self.k = 0
        self.refreshes = 0

    def to_work(self, x: torch.Tensor) -> torch.Tensor:
        return (x.permute(0, 3, 1, 2) if self.permute else x).reshape(self.work)

    def from_work(self, x: torch.Tensor) -> torch.Tensor:
        if self.permute:
            s = self.shape
            return x.reshape(s[0], s[3], s[1], s[2]).permute(0, 2, 3, 1)
        return x.reshape(self.shape)

    def project(self, x: torch.Tensor, back: bool = False) -> torch.Tensor:
        # tensordot over the leading dim, which cycles the dims: after all of them the order is restored
        for q in self.Q:
            if q is None:
                x = x.permute(*range(1, x.dim()), 0)
            else:
                x = torch.tensordot(x, q, dims=([0], [1 if back else 0]))
        return x

    def update_factors(self, G: torch.Tensor, beta: float) -> None:
        for i, L in enumerate(self.GG):
            if L is not None:
                others = [j for j in range(G.dim()) if j != i]
                self.GG[i] = beta * L + (1 - beta) * torch.tensordot(G, G, dims=(others, others))

    def step(self, p: torch.Tensor, g: torch.Tensor) -> None:
        hp = self.hp
        lr, (b1, b2), eps = hp["lr"], hp["betas"], hp.get("eps", 1e-8)
        sb = hp.get("shampoo_beta")
        sb = b2 if sb is None or sb < 0 else sb
        G = self.to_work(g)
        if self.Q is None:  # the first step: factors and the eigenbasis (descending), no update
            self.update_factors(G, sb)
            self.Q = [None if L is None else torch.linalg.eigh(L).eigenvectors.flip(1) for L in self.GG]
            return
        Gp = self.project(G)
        self.k += 1
        self.exp_avg = b1 * self.exp_avg + (1 - b1) * Gp
        self.exp_avg_sq = b2 * self.exp_avg_sq + (1 - b2) * Gp**2
        step_size = lr
        if hp.get("correct_bias", True):
            step_size = lr * math.sqrt(1 - b2**self.k) / (1 - b1**self.k)
        N = self.project(self.exp_avg / (self.exp_avg_sq.sqrt() + eps), back=True)
        if hp.get("normalize_grads", False):
            N = N / (1e-30 + N.pow(2).mean().sqrt())
        p -= step_size * self.from_work(N)
        p -= lr * hp.get("weight_decay", 0.01) * p
        # update_preconditioner: exp_avg back to the original space, factors, refresh, exp_avg projected again
        self.exp_avg = self.project(self.exp_avg, back=True)
        self.update_factors(G, sb)
        if self.k % hp.get("precondition_frequency", 10) == 0:
            self.refreshes += 1
            for i, (L, Q) in enumerate(zip(self.GG, self.Q)):
                if L is None:
                    continue
                order = torch.argsort(torch.diag(Q.T @ L @ Q), descending=True, stable=True)
                self.exp_avg_sq = self.exp_avg_sq.index_select(i, order)
                self.Q[i] = torch.linalg.qr(L @ Q[:, order]).Q
        self.exp_avg = self.project(self.exp_avg)


# dims above max_precond_dim = 6: the 9 of (4, 9), the bias of 8; the conv kernel (4, 3, 2, 2) merges into
# (4, 6, 2), its channels-last twin (4, 2, 2, 3) too; without merging the kernel has four factors
SHAPES = [(5, 3), (4, 9), (3,), (8,), (4, 3, 2, 2)]
CASES = {
    "merge-1d-decay": (dict(lr=0.01, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=3,
                            max_precond_dim=6, merge_dims=True, precondition_1d=True), [(4, 2, 2, 3)]),
    "per-dim-normalized-no-bias-correction": (dict(lr=0.02, betas=(0.9, 0.99), shampoo_beta=0.8, eps=1e-6,
                                                   weight_decay=0.0, precondition_frequency=5, max_precond_dim=6,
                                                   normalize_grads=True, correct_bias=False), [()]),
}  # fmt: skip
STEPS = 100


def run_both(hp: dict, extra_shapes: list, path: dict, steps: int = STEPS):
    """Main params in one group, the extra ones (channels-last kernel, a 0-d scalar) in a second group."""
    shapes = SHAPES + extra_shapes
    params = make_params(shapes)
    ref_params = clone_params(params)
    extra_hp = {"data_format": "channels_last"} if extra_shapes == [(4, 2, 2, 3)] else {}
    groups = [{"params": params[: len(SHAPES)]}, {"params": params[len(SHAPES) :], **extra_hp}]
    opt = stochopt.SOAP(groups, **hp, **path)
    refs = [Reference(p, {**hp, **(extra_hp if i >= len(SHAPES) else {})}) for i, p in enumerate(ref_params)]
    for t in range(steps):
        set_grads(params, t)
        set_grads(ref_params, t)
        opt.step()
        with torch.no_grad():
            for ref, p in zip(refs, ref_params):
                ref.step(p, p.grad)
    return params, ref_params, opt, refs


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case: str, host_path: dict) -> None:
    hp, extra = CASES[case]
    params, ref_params, opt, refs = run_both(hp, extra, host_path)
    assert refs[0].refreshes == (STEPS - 1) // hp["precondition_frequency"] >= 19  # QR refreshes happened
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)
    start = make_params(SHAPES + extra)
    assert all(not torch.allclose(p, q) for p, q in zip(params, start))
    # the layout of the factors: which dimensions carry one
    factored = {tuple(p.shape): [f is not None for f in opt.factors(p)] for p in params}
    if hp.get("merge_dims"):
        assert factored[(4, 3, 2, 2)] == factored[(4, 2, 2, 3)] == [True, True, True]  # (4, 6, 2)
        assert factored[(3,)] == [True] and factored[(8,)] == [False]
    else:
        assert factored[(4, 3, 2, 2)] == [True] * 4 and factored[(3,)] == [False] and factored[()] == []
    assert factored[(5, 3)] == [True, True] and factored[(4, 9)] == [True, False]
    for p, ref in zip(params, refs):  # the moments in the eigenbasis, the bases themselves
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.from_work(ref.exp_avg_sq), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.from_work(ref.exp_avg), rtol=1e-8, atol=1e-12)
        for pair, q in zip(opt.factors(p), ref.Q):
            assert (pair is None) == (q is None)
            if pair is not None:
                torch.testing.assert_close(pair[1], q, rtol=1e-8, atol=1e-10)


def test_the_first_step_only_builds_the_basis() -> None:
    params = make_params([(6, 4), (5,)])
    before = [p.detach().clone() for p in params]
    opt = stochopt.SOAP(params, lr=0.1, precondition_1d=True)
    set_grads(params, 0)
    g = params[0].grad.clone()
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # not even weight decay
    (left, q_left), (right, q_right) = opt.factors(params[0])
    torch.testing.assert_close(left, 0.05 * g @ g.T)  # 1 - betas[1]
    torch.testing.assert_close(right, 0.05 * g.T @ g)
    for factor, q in ((left, q_left), (right, q_right)):
        torch.testing.assert_close(q.T @ q, torch.eye(len(q), dtype=q.dtype))
        eigenvalues = torch.diag(q.T @ factor @ q)
        assert torch.all(eigenvalues[:-1] >= eigenvalues[1:] - 1e-12)  # descending
    assert opt.state[params[0]]["exp_avg"].abs().max() == 0
    set_grads(params, 1)
    opt.step()
    assert not torch.equal(params[0], before[0])


def test_bases_change_only_at_the_refreshes() -> None:
    params = make_params([(5, 3)])
    opt = stochopt.SOAP(params, lr=0.01, precondition_frequency=4)
    changed = []
    for t in range(14):
        set_grads(params, t)
        old = [q.clone() for _, q in opt.factors(params[0])] if t else None
        opt.step()
        if old is not None:
            changed.append(not all(torch.equal(a, q) for a, (_, q) in zip(old, opt.factors(params[0]))))
    # steps 2..14: refreshed after the Adam steps 4, 8, 12 (the calls 5, 9, 13)
    assert [t for t, c in enumerate(changed, start=2) if c] == [5, 9, 13]


def test_shampoo_beta_minus_one_is_betas_1() -> None:
    a, b = make_params([(5, 3), (4,)]), make_params([(5, 3), (4,)])
    opt_a = stochopt.SOAP(a, betas=(0.9, 0.9), shampoo_beta=-1, precondition_frequency=2)
    opt_b = stochopt.SOAP(b, betas=(0.9, 0.9), shampoo_beta=0.9, precondition_frequency=2)
    for t in range(8):
        set_grads(a, t)
        set_grads(b, t)
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_merged_shape_is_the_references_rule() -> None:
    assert merged_shape((64, 32, 3, 3), 1000) == (64, 288)
    assert merged_shape((64, 32, 3, 3), 10000) == (6144, 3)
    assert merged_shape((6, 5), 10000) == (30,)
    assert merged_shape((300, 256), 10000) == (300, 256)
    for shape in [(4, 3, 2, 2), (1, 7, 1, 3), (20000, 3), (2, 20000, 5), (1, 1)]:
        for max_dim in (1, 5, 6, 100, 10**5):
            assert list(merged_shape(shape, max_dim)) == reference_merge(shape, max_dim), (shape, max_dim)


BAD_VALUES = [
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(betas=(1.0, 0.95)), ValueError, r"betas\[0\]"),
    (dict(shampoo_beta=1.0), ValueError, "shampoo_beta"),
    (dict(shampoo_beta=-0.5), ValueError, "shampoo_beta"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(precondition_frequency=0), ValueError, "precondition_frequency"),
    (dict(precondition_frequency=2.5), TypeError, "precondition_frequency"),
    (dict(max_precond_dim=0), ValueError, "max_precond_dim"),
    (dict(merge_dims="yes"), TypeError, "merge_dims"),
    (dict(precondition_1d=1), TypeError, "precondition_1d"),
    (dict(normalize_grads=None), TypeError, "normalize_grads"),
    (dict(correct_bias=0), TypeError, "correct_bias"),
    (dict(data_format="NHWC"), ValueError, "data_format"),
    (dict(capturable=True), ValueError, "capturable"),
]


@pytest.mark.parametrize(
    "kwargs,error,match", BAD_VALUES, ids=[f"{k}={v}" for kw, _, _ in BAD_VALUES for k, v in kw.items()]
)
def test_bad_values_are_rejected_by_name(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        stochopt.SOAP(make_params([(3, 2)]), **kwargs)
