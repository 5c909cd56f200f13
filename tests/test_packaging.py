"""Lean packaging: the optimizers need torch alone, a missing extra is named, one source for the version."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import stochopt
from stochopt import cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
#: what the core install does not bring: the extras "bench" and "viz"
OPTIONAL = ["optuna", "rich", "matplotlib", "sklearn", "scipy"]

# run in a process where the optional packages are absent: a None in sys.modules makes "import optuna" fail and
# importlib.util.find_spec("optuna") answer None, as a fresh core install would
WITHOUT_EXTRAS = """
import io, json, sys
from contextlib import redirect_stderr
for name in {optional}:
    sys.modules[name] = None
import torch, stochopt
from stochopt import cli
from stochopt.extras import MissingExtraError
from stochopt.memory import GPT2, estimate

model = torch.nn.Linear(8, 4)
for opt in (stochopt.AdamW(model.parameters(), lr=1e-2), stochopt.Muon(model.parameters(), lr=1e-2)):
    before = model.weight.detach().clone()
    model(torch.randn(16, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    assert not torch.equal(before, model.weight)
assert estimate("adamw", transformer=GPT2["gpt2"]).total > 0
out = {{}}
for argv in (["bench", "--quick"], ["report"], ["viz", "paths", "--steps", "3"], ["schedule", "cosine", "--steps", "10",
             "--png", "s.png"], ["memory", "--transformer", "gpt2"]):
    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.main(argv)
    out[argv[0]] = [code, err.getvalue()]
for name, call in (("run_benchmark", lambda: stochopt.bench.run_benchmark), ("digits", stochopt.data.digits)):
    try:
        call()
        out[name] = None
    except MissingExtraError as error:
        out[name] = str(error)
print(json.dumps(out))
"""


def test_the_core_install_steps_optimizers_and_names_the_missing_extras(tmp_path):
    script = WITHOUT_EXTRAS.format(optional=OPTIONAL)
    done = subprocess.run(
        [sys.executable, "-c", "import stochopt.bench, stochopt.data\n" + script],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for command, extra in (("bench", "bench"), ("report", "bench"), ("viz", "viz"), ("schedule", "viz")):
        code, message = out[command]
        assert code == 1 and f"pip install 'stochopt[{extra}]'" in message, (command, message)
    assert out["memory"][0] == 0  # the estimator needs torch alone
    assert "stochopt[bench]" in out["run_benchmark"] and "scikit-learn" in out["digits"]
    assert not (tmp_path / "s.png").exists()


def test_one_version_everywhere(capsys):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert stochopt.__version__ == importlib.metadata.version("stochopt") == version
    try:
        cli.main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.strip() == f"stochopt {version}"
    assert (ROOT / "CHANGELOG.md").read_text().splitlines()[2].startswith(f"## {version}")


def test_the_annotations_ship_for_type_checkers():
    assert (Path(stochopt.__file__).parent / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["stochopt"]
