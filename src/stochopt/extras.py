"""The optional dependencies and the version. ``pip install stochopt`` needs torch alone; the benchmark, the
plots and the bundled datasets name their extra when what they need is missing, instead of failing deep in an
import.

Checked with ``importlib.util.find_spec``, which imports nothing: checking for Optuna does not cost its import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

#: module -> (the distribution that provides it, the extra of stochopt that installs it)
OPTIONAL = {
    "optuna": ("optuna", "bench"),
    "rich": ("rich", "bench"),
    "sklearn": ("scikit-learn", "bench"),
    "scipy": ("scipy", "bench"),  # Optuna's quasirandom sampler
    "matplotlib": ("matplotlib", "viz"),
}


class MissingExtraError(ModuleNotFoundError):
    """A feature's optional dependency is not installed; the message names the extra that installs it."""


def require(*modules: str, feature: str, extra: str | None = None) -> None:
    """Raise :class:`MissingExtraError` naming the extra to install if any of ``modules`` (keys of
    ``OPTIONAL``) is not installed; ``feature`` says what needs it, ``extra`` (default: each module's own) is the
    extra to name."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        packages = ", ".join(OPTIONAL[name][0] for name in missing)
        extras = extra or ",".join(sorted({OPTIONAL[name][1] for name in missing}))
        raise MissingExtraError(
            f"{feature} needs {packages} (not installed): pip install 'stochopt[{extras}]'", name=missing[0]
        )


def installed_version() -> str:
    """stochopt's version, as installed: pyproject.toml is its one source (``stochopt.__version__`` and
    ``stochopt --version`` read it from the installed package's metadata)."""
    try:
        return importlib.metadata.version("stochopt")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
