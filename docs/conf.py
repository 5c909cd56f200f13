"""Sphinx configuration of the API site: the README, the docs pages (Markdown, via MyST) and the reference
built from the docstrings. Build it from the repository root, strict (what tests/test_docs_site.py runs):

    python -m sphinx -W -n -c docs . site
"""

import importlib

from stochopt.extras import installed_version

project = "stochopt"
release = installed_version()
root_doc = "docs/site"
include_patterns = ["README.md", "CHANGELOG.md", "docs/**"]
exclude_patterns = ["docs/conf.py", "site", "_build"]
extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "myst_parser"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_heading_anchors = 3
autodoc_member_order = "bysource"
# methods too (a class's docstring refers to them), inherited from stochopt's own bases, not from torch's
autodoc_default_options = {
    "members": True,
    "inherited-members": "Optimizer,Module,Sampler,AveragedModel,LRScheduler,object",
}
autodoc_typehints = "none"  # the signatures show them; torch's own types have no pages here to link to
html_theme = "alabaster"
nitpicky = True  # every reference must resolve: a broken one fails the strict build
# names outside stochopt: torch and the standard library have their own sites, which this build does not fetch
nitpick_ignore_regex = [(r"py:.*", r"(torch|nn|collections|typing|optuna|Optimizer|Tensor|LRScheduler)\b.*")]


def _canonical(module: str | None, cls: str | None, target: str) -> str | None:
    """The defining module's name of ``target`` as the docstring's module (and class) see it: the public
    aliases (``stochopt.AdamW``) and imported names (``Adam`` in lazyadam) point at where autodoc documents the
    object. None where it cannot be imported."""
    scopes = [target] + ([f"{module}.{cls}.{target}", f"{module}.{target}"] if module else [])
    for dotted in scopes:
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attribute in parts[cut:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                break
            owner = getattr(obj, "__module__", None) or ""
            qualname = getattr(obj, "__qualname__", None)
            return f"{owner}.{qualname}" if qualname else None
    return None


def _resolve_alias(app, env, node, contnode):
    """A reference autodoc did not find by its written name: retried under the object's defining name; names
    that resolve to torch's objects (methods a class inherits, such as ``state_dict``) are torch's to document,
    and stay plain text, as torch's own names do (``nitpick_ignore_regex``)."""
    if node.get("refdomain") != "py":
        return None
    canonical = _canonical(node.get("py:module"), node.get("py:class"), node["reftarget"])
    if canonical is None:
        return None
    if canonical.startswith("torch."):
        return contnode
    domain = env.get_domain("py")
    retry = node.deepcopy()
    retry["reftarget"] = canonical
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], canonical, retry, contnode)


def setup(app):
    app.connect("missing-reference", _resolve_alias)
