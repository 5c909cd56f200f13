"""The registry and load_workload: names, import paths, and one clear ValueError for every bad spec."""

from __future__ import annotations

import sys
import textwrap

import pytest

from stochopt.bench.workloads import WORKLOADS, Workload, load_targets, load_workload
from stochopt.bench.workloads.convex import LeastSquares


def test_every_registered_workload_is_a_complete_workload_with_a_stored_target():
    targets = load_targets()
    for name, cls in WORKLOADS.items():
        assert issubclass(cls, Workload) and cls.name == name
        assert cls.target == targets[name]["target"] and targets[name]["source"]
        assert cls.max_steps > 0 and cls.eval_every > 0 and cls.batch_size > 0 and cls.metric and cls.description


def test_load_by_name_and_by_import_path():
    assert type(load_workload("least_squares")) is LeastSquares
    assert type(load_workload("stochopt.bench.workloads.convex:LeastSquares", dim=8, n=16)) is LeastSquares
    assert load_workload("least_squares", dim=8, n=16).dim == 8


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown workload 'nope'.*least_squares.*logistic"):
        load_workload("nope")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_pkg_xyz.mod:Thing", r"'no_such_pkg_xyz.mod:Thing': cannot import module 'no_such_pkg_xyz.mod'"),
        ("stochopt.bench.workloads.convex:Missing", r"has no attribute 'Missing'"),
        ("stochopt.bench.workloads.convex:Batch", r"is not a subclass of .*Workload"),
        ("torch.optim:AdamW", r"'torch.optim:AdamW' is not a subclass"),
        ("stochopt.bench.workloads.base:Workload", r"is abstract"),
        (":Thing", r"must have the form"),
        ("", r"registered name"),
    ],
)
def test_bad_specs_give_one_clear_value_error(spec, message):
    with pytest.raises(ValueError, match=message):
        load_workload(spec)


def test_a_module_that_fails_while_importing_is_reported_with_its_error(tmp_path, monkeypatch):
    (tmp_path / "broken_wl_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot import module 'broken_wl_mod': RuntimeError: boom at import"):
        load_workload("broken_wl_mod:X")
    sys.modules.pop("broken_wl_mod", None)


def test_a_users_workload_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "user_wl_mod.py").write_text(
        textwrap.dedent(
            """
            from stochopt.bench.workloads.convex import LeastSquares

            class Tiny(LeastSquares):
                name = "tiny"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    workload = load_workload("user_wl_mod:Tiny", n=20, dim=4)
    assert workload.name == "tiny" and workload.n == 20
    sys.modules.pop("user_wl_mod", None)


def test_unknown_options_name_the_workload():
    with pytest.raises(ValueError, match=r"workload 'logistic' does not take the options \['data_dir'\]"):
        load_workload("logistic", data_dir="/tmp")
