"""The API reference of the documentation site (docs/api/) covers the whole public API.

The site itself is built by ``sphinx-build -W`` in CI (.ci/run); these checks read the reST sources only, so
they run without Sphinx: every name of ``granet.__all__`` is listed on the API index and documented by the
module that defines it, and every public module of the package has its ``automodule`` directive.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import granet

API = Path(__file__).resolve().parent.parent / "docs" / "api"
# ``.. automodule:: name`` and the option lines right below it.
AUTOMODULE = re.compile(r"^\.\. automodule:: (\S+)\n((?:   :[\w-]+:.*\n)*)", re.MULTILINE)


def automodules() -> dict[str, str]:
    """Module name -> the options of its automodule directive, over every page of docs/api."""
    found: dict[str, str] = {}
    for page in sorted(API.glob("*.rst")):
        for match in AUTOMODULE.finditer(page.read_text(encoding="utf-8")):
            assert match.group(1) not in found, f"{match.group(1)} has two automodule directives"
            found[match.group(1)] = match.group(2)
    return found


def public_modules() -> set[str]:
    """Every module of the package none of whose name parts starts with an underscore."""
    names = {"granet"}
    for info in pkgutil.walk_packages(granet.__path__, prefix="granet."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.add(info.name)
    return names


def index_names() -> list[str]:
    """The names listed by the autosummary tables of docs/api/index.rst (after ``currentmodule granet``)."""
    text = (API / "index.rst").read_text(encoding="utf-8")
    names: list[str] = []
    for block in re.finditer(r"\.\. autosummary::\n\n((?:[ ]+\S+\n)+)", text):
        names.extend(line.strip() for line in block.group(1).splitlines())
    return names


def test_every_public_module_has_an_automodule_directive() -> None:
    documented = set(automodules())
    modules = public_modules()
    assert sorted(modules - documented) == [], "public modules missing from docs/api/*.rst"
    assert sorted(documented - modules) == [], "docs/api/*.rst documents modules that do not exist"


def test_index_lists_every_exported_name_once() -> None:
    names = index_names()
    assert len(names) == len(set(names)), "a name is listed twice on docs/api/index.rst"
    assert sorted(names) == sorted(granet.__all__)


@pytest.mark.parametrize("name", sorted(granet.__all__))
def test_exported_name_is_documented_where_it_is_defined(name: str) -> None:
    obj = getattr(granet, name)
    # autodoc (members, ignore-module-all) documents a module's own objects with a docstring.
    module = obj.__module__
    options = automodules().get(module)
    assert options is not None, f"granet.{name} is defined in {module}, which has no automodule directive"
    assert ":no-members:" not in options, f"{module} is documented without its members"
    assert obj.__doc__ and obj.__doc__.strip(), f"granet.{name} has no docstring"
    assert getattr(importlib.import_module(module), obj.__name__) is obj
