"""Sphinx configuration of the granet documentation site.

Build it with ``sphinx-build -W --keep-going -b html docs docs/_build/html`` after
``pip install -c constraints.txt -e ".[docs]"``. The pages are the README (``index.md``), the Markdown
files of ``docs/`` and the API reference (``api/``), which autodoc builds from the docstrings by
importing the package; the build needs no network.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
# The checkout's own sources come first, so the site documents this tree even when another granet is
# installed.
sys.path.insert(0, str(ROOT / "src"))

project = "granet"
author = "granet contributors"
copyright = "granet contributors"
release = version = importlib.import_module("granet").__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "myst_parser",
    "sphinxcontrib.mermaid",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"granet {release}"
html_static_path: list[str] = []

# Every cross-reference must resolve: a broken reference in a docstring is a warning, so an error under
# -W. References to other projects' objects (torch, numpy, the standard library, ...) have no target
# here (intersphinx would need the network) and are ignored; references to granet's own objects are not.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!granet\b)[A-Za-z_][\w.]*\.[\w.]+"),  # dotted names outside granet: torch.Tensor, ...
]
nitpick_ignore = [
    # torch.distributed.tensor.DTensor, imported for the type checker only (granet.sparsity.fsdp_layout).
    ("py:class", "DTensor"),
]

# --- MyST (the Markdown pages) ---
myst_heading_anchors = 4  # links to "page.md#a-heading" (docs/mnist1d.md) resolve
myst_fence_as_directive = ["mermaid"]  # docs/architecture.md's ```mermaid blocks become diagrams

# --- autodoc ---
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
    # Each object is documented once, in the module that defines it: a module's re-exports (its __all__
    # may name imported objects) are left to their own module. References to a re-exported name
    # (granet.Sparsifier, granet.train.TrainConfig) are resolved to it by _resolve_granet_name below.
    "ignore-module-all": True,
}
autodoc_typehints = "signature"
# Defaults as written in the source (``layer_types=DEFAULT_LAYER_TYPES``), not their repr.
autodoc_preserve_defaults = True
autodoc_class_signature = "separated"
# Heavy optional frameworks, replaced by stand-ins while autodoc imports the modules, so building the site
# needs none of them: the integrations subclass the callback types of transformers and lightning, and
# granet.train.tensorboard imports torch.utils.tensorboard, which needs the tensorboard package.
autodoc_mock_imports = ["transformers", "lightning", "torch.utils.tensorboard"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autosummary_generate = False

# --- mermaid: rendered in the reader's browser; the build itself fetches nothing ---
mermaid_output_format = "raw"


def _canonical_name(target: str) -> Optional[str]:
    """The name under which autodoc documents the object ``target`` names, if it is another name.

    ``granet.Sparsifier`` is documented as ``granet.sparsity.sparsifier.Sparsifier``: the longest importable
    module prefix of ``target`` is imported, the rest looked up as attributes, and the object's own
    ``__module__`` and ``__qualname__`` name it.
    """
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str) or not module.startswith("granet"):
            return None
        canonical = f"{module}.{qualname}"
        return canonical if canonical != target else None
    return None


def _resolve_granet_name(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a Python reference that names a granet object where it is not documented.

    ``granet.Sparsifier`` (a re-export), and ``Sparsifier`` written in a module that imports it, both
    resolve to ``granet.sparsity.sparsifier.Sparsifier``: a bare name is looked up as Python would, in the
    class and then the module the reference is written in.
    """
    if node.get("refdomain") != "py":
        return None
    target = str(node.get("reftarget", "")).lstrip(".~")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target] if target.startswith("granet.") else []
    if module and str(module).startswith("granet"):
        if cls:
            candidates.append(f"{module}.{cls}.{target}")
        candidates.append(f"{module}.{target}")
    domain = env.get_domain("py")
    for candidate in candidates:
        canonical = _canonical_name(candidate)
        if canonical is not None:
            found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode)
            if found is not None:
                return found
    return None


_ATTRIBUTE_KINDS = ("attribute", "data", "property")
_original_lines: dict[tuple[str, str], list[str]] = {}


def _keep_attribute_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Before napoleon: remember the docstring of an attribute, a constant or a property."""
    if what in _ATTRIBUTE_KINDS:
        _original_lines[(what, name)] = list(lines)


def _restore_attribute_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """After napoleon: put that docstring back as it was written.

    napoleon reads the first line of such a docstring as ``type: description``, but granet's say what the
    value is in prose ("The target density: ..."), and their types come from the annotations.
    """
    original = _original_lines.pop((what, name), None)
    if original is not None:
        lines[:] = original


def _factory_defaults(app: Any, what: str, name: str, obj: Any, options: Any, signature: Optional[str],
                      return_annotation: Optional[str]) -> Optional[tuple[Optional[str], Optional[str]]]:
    """Show a dataclass field's ``default_factory`` default as ``...``.

    ``inspect`` writes it ``<factory>``, which is no Python expression: Sphinx then cannot parse the
    signature and splits it at every comma, ``dict[str, int]`` included.
    """
    if signature is None or "<factory>" not in signature:
        return None
    return signature.replace("<factory>", "..."), return_annotation


def _field_help(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Document the fields of a config dataclass from their ``help`` metadata.

    :class:`~granet.sparsity.config.SparsityConfig` and the sections of
    :class:`~granet.train.config.TrainConfig` write what each field means once, in
    ``field(metadata={"help": ...})`` (what ``granet train --help`` prints); each such field becomes an
    attribute of the class's entry, with its type and default.
    """
    if what != "class" or not dataclasses.is_dataclass(obj):
        return
    documented = [f for f in dataclasses.fields(obj) if "help" in f.metadata]
    if not documented:
        return
    from sphinx.util.inspect import object_description
    from sphinx.util.typing import stringify_annotation

    hints = typing.get_type_hints(obj)
    for f in documented:
        lines.extend(["", f".. attribute:: {f.name}", f"   :type: {stringify_annotation(hints[f.name], 'smart')}"])
        if f.default is not dataclasses.MISSING:
            lines.append(f"   :value: {object_description(f.default)}")
        lines.extend(["", *(f"   {line}" for line in str(f.metadata["help"]).splitlines())])


def setup(app: Any) -> None:
    """Register the resolver of granet names and the attribute docstrings' guard from napoleon."""
    app.connect("missing-reference", _resolve_granet_name)
    app.connect("autodoc-process-signature", _factory_defaults)
    app.connect("autodoc-process-docstring", _keep_attribute_docstring, priority=100)
    app.connect("autodoc-process-docstring", _restore_attribute_docstring, priority=900)
    app.connect("autodoc-process-docstring", _field_help, priority=900)
