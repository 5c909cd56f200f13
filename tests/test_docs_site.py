"""The API site (docs/conf.py): the README, the docs pages and the reference from the docstrings build with
Sphinx in strict mode (every warning an error, every reference resolved), and a broken reference fails it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("sphinx")  # a test dependency: missing, the suite's install is broken
pytest.importorskip("myst_parser")


def build(source: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html", "-c",
               str(source / "docs"), str(source), str(out)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_the_site_builds_strict_and_a_broken_reference_fails_it(tmp_path):
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr
    api = (tmp_path / "site" / "docs" / "api.html").read_text()
    for documented in ("stochopt.optim.adam.AdamW", "stochopt.optim.muon.Muon", "stochopt.training.param_groups"):
        assert f'id="{documented}' in api
    assert (tmp_path / "site" / "docs" / "migration.html").is_file()

    broken = tmp_path / "broken"
    shutil.copytree(ROOT / "docs", broken / "docs")
    for name in ("README.md", "CHANGELOG.md"):
        shutil.copy(ROOT / name, broken / name)
    page = broken / "docs" / "migration.md"
    page.write_text(page.read_text() + "\nSee {py:func}`stochopt.no_such_function`.\n")
    done = build(broken, tmp_path / "broken-site")
    assert done.returncode != 0 and "stochopt.no_such_function" in done.stderr
